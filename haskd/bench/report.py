"""Markdown tables of any benchmark result dict (what ``haskd benchmark`` prints)."""
from __future__ import annotations


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _head(*cols) -> list:
    """A blank line, then a Markdown table's header and rule."""
    return ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def to_markdown(res: dict) -> str:
    """Human-readable tables of any benchmark result dict."""
    lines = []
    env = res.get("env", {})
    if env:
        lines.append(f"device {env.get('device')}, {env.get('threads')} threads, torch {env.get('torch')}, "
                     f"sparse backend {env.get('sparse_backend')}, spconv {env.get('spconv')}, "
                     f"load {env.get('loadavg')}")
    if "latency" in res:
        lines += _head("model", "median s/scene", "min", "max", "points/s", "peak MiB", "params")
        for k, v in res["latency"].items():
            mins = sum(s["min"] for s in v["scenes"]) / len(v["scenes"])
            maxs = sum(s["max"] for s in v["scenes"]) / len(v["scenes"])
            pk = "ensemble" if k.startswith("ensemble") else k
            lines.append(f"| {k} | {_fmt(v['median_s_per_scene'])} | {_fmt(mins)} | {_fmt(maxs)} | "
                         f"{v['points_per_s']:.0f} | {_fmt(res['memory_mb'].get('infer_' + k), 0)} | "
                         f"{res['params'].get(pk, '-')} |")
    if "train_step" in res:
        lines += _head("training task", "median step s", "min", "max", "peak MiB", "setup s")
        for k, v in res["train_step"].items():
            if "median" in v:
                lines.append(f"| {k} | {_fmt(v['median'])} | {_fmt(v['min'])} | {_fmt(v['max'])} | "
                             f"{_fmt(v['peak_mb'], 0)} | {_fmt(v['setup_s'], 2)} |")
    if res.get("ratios"):
        lines += _head("ratio", "value")
        lines += [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    if "layer_types" in res:
        lines += ["", f"{res.get('backend', 'torch')} backend; dense matmul peak {res['dense_gflops_peak']:.1f} GFLOP/s, copy bandwidth "
                      f"{res['copy_gbps']:.1f} GB/s; room {res['voxels']} voxels",
                  *_head("layer type", "layers", "pairs", "GFLOP fwd", "fwd s", "fwd GFLOP/s", "bwd s", "bwd GFLOP/s",
                         "fwd / dense", "bwd / dense", "GB fwd / bwd", "bound fwd / bwd", "fwd / roofline",
                         "bwd / roofline")]
        for k, v in res["layer_types"].items():
            lines.append(f"| {k} | {v['layers']} | {v['pairs']} | {v['gflop']:.2f} | {v['fwd_s']:.4f} | "
                         f"{v['fwd_gflops']:.1f} | {v['bwd_s']:.4f} | {v['bwd_gflops']:.1f} | "
                         f"{v['fwd_fraction_of_dense']:.2f} | {v['bwd_fraction_of_dense']:.2f} | "
                         f"{v['fwd_gb']:.3f} / {v['bwd_gb']:.3f} | {v['fwd_bound']} / {v['bwd_bound']} | "
                         f"{v['fwd_fraction_of_roofline']:.2f} | {v['bwd_fraction_of_roofline']:.2f} |")
    if "unet" in res:
        lines += _head("whole UNet", "threads", "forward s", "step s", "mismatching rows", "note")
        for v in res["unet"]:
            lines.append(f"| {v['backend']} | {v['threads']} | {_fmt(v.get('forward'))} | {_fmt(v.get('step'))} | "
                         f"{v.get('mismatch_rows', '-')} | {v.get('note', '')} |")
    if "loading" in res:
        lines += _head("workers", "wait s/step", "step s", "loading share")
        for v in res["loading"]:
            lines.append(f"| {v['workers']} | {_fmt(v['wait_s'])} | {_fmt(v['step_s'])} | {v['share']:.1%} |")
    if "chunked" in res:
        lines += ["", f"{res['scene']}: {res['points']} points, voxel {res['voxel_size']} m, label agreement "
                      f"{res['label_agreement']:.4f}", *_head("path", "peak RSS MiB", "seconds", "chunks"),
                  f"| chunked (max_voxels {res['max_voxels']}) | {_fmt(res['chunked']['peak_rss_mb'], 0)} | "
                  f"{_fmt(res['chunked']['seconds'], 2)} | {res['chunked']['chunks']} |",
                  f"| one-shot | {_fmt(res['one_shot']['peak_rss_mb'], 0)} | {_fmt(res['one_shot']['seconds'], 2)} "
                  f"| 1 |"]
    if "ddp" in res:
        lines += _head("setup", "samples/s", "wall s", "steps")
        for v in res["ddp"]:
            lines.append(f"| {v['setup']} | {_fmt(v['samples_per_s'], 2)} | {_fmt(v['wall_s'], 2)} | {v['steps']} |")
    return "\n".join(lines)
