"""diffusers attention processors that measure and suppress attention sinks (diffusers 0.42).

  SinkJointAttnProcessor  replaces JointAttnProcessor2_0 (SD3 / SD3.5 MM-DiT joint attention): image
                          and text streams projected and QK-normed exactly as the stock processor does,
                          keys ordered [image, text], the image queries first (n_query = image tokens).
  SinkAttnProcessor       replaces AttnProcessor2_0 (SDXL-style UNet self- and cross-attention): every
                          query is an image query.
  install_sink_processors(model, layers, ...)  puts them on the chosen layers (for SD3 / SD3.5, transformer
                          block indices; (i, "attn2") picks an SD3.5 dual-attention block's second
                          attention) and returns the SinkRecorder that collects one record of statistics
                          per call.

In "measure" mode the output comes from F.scaled_dot_product_attention, exactly the stock processor's
call, so the model's output is bit-identical to the stock model; the statistics come from
diffkern.sink_attention(mode="measure") on the same q, k, v. Other modes return sink_attention's output;
with statistics=False (mode "random", intervention "mask" or "scale": the keys are known before the call), the
same random keys are suppressed by diffkern.sink_attention_given, one biased flash forward, and each call's
record holds the indices alone.
Forward only, like the ops: run the model under torch.no_grad().
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .op import ATTN_OP, _check_mode, _fail, _intervention, _random_keys, sink_attention, sink_attention_given

_SCALAR_STATS = ("max_mass", "index0_mass", "row_entropy", "top5_mass", "top_k_conc", "max_act", "sink_at_index0",
                 "sink_in_image", "sink_in_text", "top_sink_mass_after")


_RECORDERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class SinkRecorder:
    """One record per attention call: layer name, call index, mode, the scalar statistics (floats), and
    the chosen indices and their masses (CPU tensors; None in measure mode).

    `add` keeps a call's statistics on the model's device, through the opaque op diffkern::sink_record
    (no host sync, and no graph break or recompile under torch.compile: the compiler sees one op, not a
    Python list growing); reading `records` converts every pending call at once, with one transfer.
    """

    def __init__(self):
        self._records: list = []
        self._pending: list = []
        _RECORDERS[id(self)] = self

    def __setstate__(self, state) -> None:  # a copy (copy.deepcopy, pickle) records under its own id
        self.__dict__.update(state)
        _RECORDERS[id(self)] = self

    def add(self, layer: str, calls: torch.Tensor, mode: str, stats: dict) -> None:
        """Records one call (its index: the counter `calls`, which this increments)."""
        names = [k for k in _SCALAR_STATS if stats.get(k) is not None]
        scalars = torch.stack([stats[k].detach() for k in names]) if names else calls.new_zeros(0, dtype=torch.float32)
        _sink_record(calls, scalars, stats["indices"], stats.get("index_mass"), id(self), layer, mode, ",".join(names))

    @property
    def records(self) -> list:
        if self._pending:
            pending, self._pending = self._pending, []
            device = pending[0]["scalars"].device
            scalars = iter(torch.cat([p["scalars"].to(device, torch.float64) for p in pending]).tolist())
            calls = torch.stack([p["call"].to(device) for p in pending]).tolist()
            for p, call in zip(pending, calls):
                rec = {"layer": p["layer"], "call": call, "mode": p["mode"]}
                rec.update({k: None for k in _SCALAR_STATS})
                rec.update({k: next(scalars) for k in p["names"]})
                rec.update({k: None if p[k] is None else p[k].detach().cpu() for k in ("indices", "index_mass")})
                self._records.append(rec)
        return self._records

    def clear(self) -> None:
        self._records.clear()
        self._pending.clear()


@torch.library.custom_op("diffkern::sink_record", mutates_args=("calls",))
def _sink_record(calls: torch.Tensor, scalars: torch.Tensor, indices: torch.Tensor | None,
                 index_mass: torch.Tensor | None, recorder: int, layer: str, sink_mode: str, names: str) -> None:
    """Appends a call's statistics (copies, left on their device) to SinkRecorder `recorder` (its id)
    and increments the call counter `calls` (a 0-dim int64 tensor)."""
    _RECORDERS[recorder]._pending.append({
        "layer": layer, "call": calls.clone(), "mode": sink_mode, "names": names.split(",") if names else [],
        "scalars": scalars.clone(), "indices": None if indices is None else indices.clone(),
        "index_mass": None if index_mass is None else index_mass.clone()})
    calls += 1


@_sink_record.register_fake
def _sink_record_fake(calls, scalars, indices, index_mass, recorder, layer, sink_mode, names):
    return None


class _SinkProcessor:
    """Settings and per-call bookkeeping shared by both processors."""

    def __init__(self, layer: str = "", mode: str = "measure", k_sink: int = 1, row_scope: str = "image",
                 bias: float = -1e4, seed: int | None = None, recorder: SinkRecorder | None = None,
                 intervention: str = "mask", alpha: float = 0.0, statistics: bool = True):
        _check_mode(mode, row_scope, k_sink, bias, seed)  # refused at install, not at the model's first call
        _intervention(intervention, alpha, bias)
        if not statistics and (mode != "random" or intervention == "value"):
            _fail(ATTN_OP, f"statistics=False needs the keys before the call: mode 'random' with intervention 'mask' "
                           f"or 'scale' (the other modes select from the call's attention mass), got mode {mode!r}, "
                           f"intervention {intervention!r}")
        self.statistics = statistics
        self.layer, self.mode, self.k_sink, self.row_scope = layer, mode, k_sink, row_scope
        self.bias, self.seed, self.intervention, self.alpha = bias, seed, intervention, alpha
        self.recorder = recorder if recorder is not None else SinkRecorder()
        # The call counter (the random mode's call_index: a fresh, reproducible set at every call), a
        # tensor so that counting neither specializes a compiled graph nor reads the device.
        self.calls = torch.zeros((), dtype=torch.int64)

    def _attend(self, query, key, value, n_query: int):
        """[B, H, N_q, d] attention of the (already normed, concatenated) q, k, v, with statistics recorded."""
        if self.calls.device != query.device:  # the counter lives beside the statistics: no copy per call
            self.calls = self.calls.to(query.device)
        if not self.statistics:  # sink_attention's random draw, suppressed in one biased forward
            B, H, N_k = query.shape[0], query.shape[1], key.shape[2]
            idx = _random_keys(B, N_k, min(self.k_sink * H, N_k), self.seed, self.calls, query.device)
            out = sink_attention_given(query, key, value, idx, row_scope=self.row_scope, n_query=n_query,
                                       bias=self.bias, intervention=self.intervention, alpha=self.alpha)
            self.recorder.add(self.layer, self.calls, self.mode, {"indices": idx})
            return out
        out, stats = sink_attention(query, key, value, k_sink=self.k_sink, mode=self.mode, row_scope=self.row_scope,
                                    n_query=n_query, bias=self.bias, seed=self.seed, call_index=self.calls,
                                    return_stats=True, intervention=self.intervention, alpha=self.alpha)
        if self.mode == "measure":
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        self.recorder.add(self.layer, self.calls, self.mode, stats)
        return out


def _heads(x, batch_size, heads, head_dim):
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


def _split_qk_norm(attn, query, key, value, batch_size):
    """Projected [B, N, H*d] q, k, v -> [B, H, N, d] with attn's QK-norm applied, and the head size d."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (_heads(x, batch_size, attn.heads, head_dim) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class SinkJointAttnProcessor(_SinkProcessor):
    """JointAttnProcessor2_0 with sink measurement/suppression (SD3 / SD3.5 joint attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("SinkJointAttnProcessor: attention_mask is not supported")
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = _split_qk_norm(
            attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), batch_size)
        if encoder_hidden_states is not None:
            cq, ck, cv = (_heads(p(encoder_hidden_states), batch_size, attn.heads, head_dim)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, cq), (key, ck), (value, cv)))
        hidden_states = self._attend(query, key, value, n_query=residual.shape[1])
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], \
                hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class SinkAttnProcessor(_SinkProcessor):
    """AttnProcessor2_0 with sink measurement/suppression (SDXL-style UNet attention, self or cross)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("SinkAttnProcessor: attention_mask is not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value, head_dim = _split_qk_norm(
            attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), batch_size)
        hidden_states = self._attend(query, key, value, n_query=query.shape[2])
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_sink_processors(model, layers, processor=None, **settings) -> SinkRecorder:
    """Puts a sink processor on each chosen layer of a diffusers model; the other layers keep theirs.

    layers: a collection (or a single one) of
        - i (int): on a model with `transformer_blocks` (SD3Transformer2DModel, SD3.5 included), block i's
          joint attention `transformer_blocks.{i}.attn`, e.g. {6, 12, 18}; negative i counts from the last
          block. On a model without them (an SDXL-style UNet), the i-th entry of model.attn_processors.
        - (i, name): the attention `name` of transformer block i, e.g. (1, "attn2") for the second (image-only)
          attention of an SD3.5 dual-attention block (diffusers' `dual_attention_layers`); (i, "attn") is i.
        - a processor name, a key of model.attn_processors, e.g. "transformer_blocks.1.attn2.processor".
        Anything else, or an entry naming no attention layer, raises ValueError naming `layers`.
    processor: SinkJointAttnProcessor or SinkAttnProcessor (default: chosen per layer from the stock
        processor's kind; SD3.5's attn2 runs joint attention without a text stream, every query an image
        query). settings: mode, k_sink, row_scope, bias, seed, intervention, alpha (see
        diffkern.sink_attention; mode "anti_sink" suppresses image tokens as keys, so it refuses, at the
        first call, a cross-attention whose keys are the text alone), statistics (default True; False with mode
        "random": one biased flash forward per call, diffkern.sink_attention_given, records hold the indices
        only). Returns the SinkRecorder all installed processors share.
    """
    recorder = settings.pop("recorder", None) or SinkRecorder()
    current = model.attn_processors
    chosen = _layer_names(model, layers, list(current))
    new = {}
    for name, proc in current.items():
        if name not in chosen:
            new[name] = proc
            continue
        cls = processor or (SinkJointAttnProcessor if "Joint" in type(proc).__name__ else SinkAttnProcessor)
        new[name] = cls(layer=name.removesuffix(".processor"), recorder=recorder, **settings)
    model.set_attn_processor(new)
    return recorder


def _layer_names(model, layers, names: list) -> set:
    """install_sink_processors' `layers` -> the set of attn_processors keys it names (see there)."""
    blocks = getattr(model, "transformer_blocks", None)
    n_blocks = None if blocks is None else len(blocks)
    if isinstance(layers, (int, str)) or _is_block_pair(layers):
        layers = [layers]
    chosen = set()
    for entry in layers:
        if isinstance(entry, str):
            chosen.add(entry)
            continue
        if n_blocks is None:
            if _is_int(entry) and -len(names) <= entry < len(names):
                chosen.add(names[entry])
                continue
            expected = f"attention layer indices in [0, {len(names)})"
        else:
            index, attn = (entry, "attn") if _is_int(entry) else entry if _is_block_pair(entry) else (None, None)
            if index is not None and -n_blocks <= index < n_blocks:
                name = f"transformer_blocks.{index % n_blocks}.{attn}.processor"
                if name not in names:
                    raise ValueError(f"install_sink_processors: layers entry {entry!r}: transformer block "
                                     f"{index % n_blocks} has no attention {attn!r}")
                chosen.add(name)
                continue
            expected = f"transformer block indices in [0, {n_blocks}), (block index, attention name) pairs"
        raise ValueError(f"install_sink_processors: layers must hold {expected} or processor names, got {entry!r}")
    unknown = chosen - set(names)
    if unknown:
        raise ValueError(f"install_sink_processors: layers names no attention layer {sorted(unknown)}")
    return chosen


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_block_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and _is_int(x[0]) and isinstance(x[1], str)
