"""DAR: depth-adaptive routing of the residual stream (specs/dar.md)."""
from .diagnose import diagnose
from .gather import dar_gather
from .op import dar_route
from .reference import dar_route_reference

__all__ = ["dar_gather", "diagnose", "dar_route", "dar_route_reference"]
