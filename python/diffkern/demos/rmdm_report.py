"""The R-MDM demo's report: across-seed intervals, the paper's paired comparisons, Markdown tables and a plot.

Every number is a mean over seeds with its Student-t 95% interval (diffkern.demos.seeds.t_interval);
a comparison between two configurations is the interval of their per-seed differences (same seed, same
test problems).
"""
from __future__ import annotations


from .. import _optional
from .seeds import fmt, t_interval_dict

METRICS = {"sudoku": ("vpr", "cell_acc"), "countdown": ("right_token", "validity")}
LABELS = {"vpr": "valid-puzzle rate (VPR)", "cell_acc": "blank-cell accuracy", "right_token": "right-token rate",
          "validity": "equation validity", "sudoku": "Sudoku", "countdown": "Countdown-4"}


def _key(T: int, n_iter: int) -> str:
    return f"T={T},L_s={n_iter}"


def _per_seed(runs, task: str, model: str) -> list:
    """The runs of (task, model) ordered by seed."""
    return sorted((r for r in runs if r["task"] == task and r["model"] == model), key=lambda r: r["seed"])


def comparisons(cfg) -> list:
    """(label, (model, key), (model, key)) pairs whose per-seed difference tests one of the paper's claims."""
    K, L, T = cfg.K, cfg.L, cfg.t_fixed
    rec = ("recursive", _key(T, L))
    out = [(f"iso-FLOP: ({K}x{L}) - ({K * L}x1), T={T}", rec, ("iso-FLOP", _key(T, 1))),
           (f"iso-param: ({K}x{L}) - ({K}x1), T={T}", rec, ("iso-param", _key(T, 1))),
           (f"fewer steps: ({K}x{L}) at T={T} - ({K * L}x1) at T={max(cfg.t_grid)}", rec,
            ("iso-FLOP", _key(max(cfg.t_grid), 1)))]
    out += [(f"L_s > L_t: ({K}x{L}) L_s={n} - L_s={L}, T={T}", ("recursive", _key(T, n)), rec)
            for n in cfg.ls_grid if n > L]
    return out


def summarize(runs: list, cfg) -> dict:
    """{task: {model: {params, final_loss, train_cpu_s, points: {key: {metric: interval}}}}, "paired": [...]}.

    An interval is a dict of diffkern.sinks.bootstrap.Interval's fields (mean, lo, hi, level, values).
    """
    out = {"paired": []}
    for task, metric_names in METRICS.items():
        out[task] = {}
        for model in cfg.models():
            rs = _per_seed(runs, task, model)
            if not rs:
                continue
            out[task][model] = {
                "K": rs[0]["K"], "L": rs[0]["L"], "params": rs[0]["params"],
                "final_loss": t_interval_dict([r["train"]["final_loss"] for r in rs]),
                "train_cpu_s": t_interval_dict([r["train"]["cpu_s"] for r in rs]),
                "points": {key: {m: t_interval_dict([r["scores"][key][m] for r in rs])
                                 for m in metric_names} for key in rs[0]["scores"]}}
        for label, (ma, ka), (mb, kb) in comparisons(cfg):
            a, b = _per_seed(runs, task, ma), _per_seed(runs, task, mb)
            for m in metric_names:
                diff = [ra["scores"][ka][m] - rb["scores"][kb][m] for ra, rb in zip(a, b)]
                out["paired"].append({"task": task, "metric": m, "comparison": label,
                                      **t_interval_dict(diff)})
    return out


def _sweeps(cfg, model: str) -> dict:
    """sweep name -> [(x, key)] of the points the model was scored at."""
    K, L = cfg.models()[model]
    sweeps = {"T": [(T, _key(T, L)) for T in cfg.t_grid]}
    if K == cfg.K:
        sweeps["L_s"] = [(n, _key(cfg.t_fixed, n)) for n in cfg.ls_grid]
    return sweeps


def markdown(result: dict, cfg) -> str:
    """The demo's tables: models, every metric against T and against L_s, the paired comparisons."""
    s, t = result["summary"], result["timing"]
    lines = ["# R-MDM: recursive vs iso-FLOP vs iso-parameter", "",
             f"d={cfg.d}, {cfg.heads} heads, batch {cfg.batch}, lr {cfg.lr:g}, t ~ U({cfg.t_min:g}, 1), "
             f"steps {cfg.steps}, seeds {list(cfg.seeds)}, Sudoku with {cfg.clues} clues (unique solutions), "
             f"{cfg.n_train:,} training / {cfg.n_test} test problems per task; top-k unmasking. "
             f"Mean over seeds [Student-t 95% interval]. Run: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU, "
             f"{t['workers']} worker(s).", "",
             "| task | model | K x L | params | block evals / training step | final loss | train CPU s / seed |",
             "|---|---|---|---|---|---|---|"]
    for task in METRICS:
        for model, m in s[task].items():
            lines.append(f"| {LABELS[task]} | {model} | {m['K']}x{m['L']} | {m['params']:,} | {m['K'] * m['L']} | "
                         f"{fmt(m['final_loss'])} | {m['train_cpu_s']['mean']:.0f} |")
    for task, metric_names in METRICS.items():
        for metric in metric_names:
            for sweep, fixed in (("T", "L_s = L_t"), ("L_s", f"T = {cfg.t_fixed}")):
                models = [m for m in s[task] if sweep in _sweeps(cfg, m)]
                xs = [x for x, _ in _sweeps(cfg, models[0])[sweep]]
                lines += ["", f"### {LABELS[task]}: {LABELS[metric]} vs {sweep} ({fixed})", "",
                          "| model | " + " | ".join(f"{sweep}={x}" for x in xs) + " |",
                          "|---|" + "---|" * len(xs)]
                for model in models:
                    K, L = cfg.models()[model]
                    pts = s[task][model]["points"]
                    lines.append(f"| {model} ({K}x{L}) | " + " | ".join(
                        fmt(pts[key][metric]) for _, key in _sweeps(cfg, model)[sweep]) + " |")
    lines += ["", "### Paired per-seed differences (the paper's claims)", "",
              "| task | metric | comparison | difference [95% interval] |", "|---|---|---|---|"]
    lines += [f"| {LABELS[p['task']]} | {LABELS[p['metric']]} | {p['comparison']} | {fmt(p)} |" for p in s["paired"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, cfg, path: str) -> None:
    """One panel per (task metric, sweep): mean over seeds with the t interval as error bars."""
    plt = _optional.pyplot("demos")
    s = result["summary"]
    rows = [(task, m) for task, ms in METRICS.items() for m in ms]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3 * len(rows)), squeeze=False)
    colors = dict(zip(cfg.models(), ("C0", "C1", "C2")))
    for (task, metric), ax_row in zip(rows, axes):
        for ax, sweep in zip(ax_row, ("T", "L_s")):
            for model in s[task]:
                K, L = cfg.models()[model]
                points = _sweeps(cfg, model).get(sweep)
                if points is None:  # the iso-FLOP model at T = t_fixed, as a reference level
                    ax.axhline(s[task][model]["points"][_key(cfg.t_fixed, L)][metric]["mean"], ls="--",
                               color=colors[model], label=f"{model} ({K}x{L}), L_s={L}")
                    continue
                ivs = [s[task][model]["points"][key][metric] for _, key in points]
                means = [iv["mean"] for iv in ivs]
                err = [[iv["mean"] - iv["lo"] for iv in ivs], [iv["hi"] - iv["mean"] for iv in ivs]]
                ax.errorbar([x for x, _ in points], means, yerr=err, marker="o", capsize=3, color=colors[model],
                            label=f"{model} ({K}x{L})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(cfg.t_grid if sweep == "T" else cfg.ls_grid))
            ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("denoising steps T (L_s = L_t)" if sweep == "T"
                          else f"inference depth L_s (T = {cfg.t_fixed})")
            ax.set_ylabel(LABELS[metric], fontsize=8)
            ax.set_title(LABELS[task], fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
