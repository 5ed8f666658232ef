"""torch.compile: graph breaks of the routing path and compiled throughput ratios (eval, fp32, 224 px).

- graph breaks: `torch._dynamo.explain` on Mobile V-MoE-Tiny (image routing) and on the token-routing model for
  every experts backend;
- image routing compiled with `fullgraph=True` (it must compile without graph breaks) vs transformers' ViT
  compiled the same way, batch 32 (and batch 1 unless --quick);
- token routing (E=8, k=2, all blocks) compiled with the backends that compile without breaks (`grouped_mm`; the
  `eager` loop has data-dependent shapes and is compiled with graph breaks) vs the compiled ViT with MLP 1536.

Compilation takes about 30-60 s per model and shape on 2 cores; the whole run takes a few minutes.

    python benchmarks/bench_compile.py [--quick]
"""

import argparse
import time

import torch

from common import (
    dense_vit,
    goal,
    image_config,
    interleaved,
    machine_info,
    machine_line,
    matmul_peak,
    md_table,
    pixels,
    ratio_stats,
    summary,
    token_config,
    vit_flops,
    vmoe,
    vmoe_flops,
    write_results,
)


def explain(model, x) -> dict:
    torch._dynamo.reset()
    with torch.inference_mode():
        exp = torch._dynamo.explain(model)(x)
    reasons = sorted({str(r.reason).splitlines()[0] for r in exp.break_reasons})
    return {"graphs": exp.graph_count, "graph_breaks": exp.graph_break_count, "reasons": reasons}


def compiled(model, x, fullgraph: bool) -> tuple:
    start = time.perf_counter()
    fn = torch.compile(model, fullgraph=fullgraph)
    with torch.inference_mode():
        fn(x)
    return fn, time.perf_counter() - start


def time_pair(ours, ref, x, reps) -> dict:
    with torch.inference_mode():
        times = interleaved({"ours": lambda: ours(x), "ref": lambda: ref(x)}, reps=reps, warmup=1)
    return {"ours": summary(times["ours"]), "ref": summary(times["ref"]),
            "throughput_ratio": ratio_stats(times["ours"], times["ref"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 32 only, image routing only, few rounds")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 8
    info = machine_info()
    peak = matmul_peak()["gflops"]
    results = {"machine": info, "matmul_peak_gflops": peak, "explain": {}, "image": {}, "token": {}}

    image_model = vmoe(image_config()).eval()
    vit = dense_vit(768).eval()
    results["explain"]["image"] = explain(image_model, pixels(2))
    token_models = {b: vmoe(token_config(), b).eval() for b in ("eager", "grouped_mm", "batched_mm")}
    for backend, model in token_models.items():
        results["explain"][f"token_{backend}"] = explain(model, pixels(2))
    torch._dynamo.reset()

    flops_img = vmoe_flops(image_model.config)
    for batch in (32,) if args.quick else (32, 1):
        x = pixels(batch)
        ours, t_ours = compiled(image_model, x, fullgraph=True)
        ref, t_ref = compiled(vit, x, fullgraph=True)
        res = time_pair(ours, ref, x, reps if batch == 32 else 4 * reps)
        res["compile_s"] = {"ours": t_ours, "ref": t_ref}
        res["fraction_of_peak"] = flops_img * batch / res["ours"]["median_s"] / 1e9 / peak
        res["ref_fraction_of_peak"] = vit_flops(mlp=768) * batch / res["ref"]["median_s"] / 1e9 / peak
        with torch.inference_mode():
            res["max_abs_diff_vs_eager"] = float((ours(x).logits - image_model(x).logits).abs().max())
        results["image"][batch] = res

    if not args.quick:
        x = pixels(32)
        vit2x = dense_vit(1536).eval()
        ref, t_ref = compiled(vit2x, x, fullgraph=True)
        for backend in ("grouped_mm", "eager"):
            ours, t_ours = compiled(token_models[backend], x, fullgraph=backend != "eager")
            res = time_pair(ours, ref, x, reps)
            res["compile_s"] = {"ours": t_ours, "ref": t_ref}
            results["token"][backend] = res

    rows = []
    for batch, res in results["image"].items():
        r = res["throughput_ratio"]
        rows.append(["image (fullgraph)", batch, f"{r['median']:.3f} [{r['q1']:.2f}, {r['q3']:.2f}]",
                     f"{100 * res['fraction_of_peak']:.0f}% / {100 * res['ref_fraction_of_peak']:.0f}%",
                     f"{res['compile_s']['ours']:.0f} s"])
    for backend, res in results["token"].items():
        r = res["throughput_ratio"]
        rows.append([f"token {backend}" + (" (graph breaks)" if backend == "eager" else " (fullgraph)"), 32,
                     f"{r['median']:.3f} [{r['q1']:.2f}, {r['q3']:.2f}]", "", f"{res['compile_s']['ours']:.0f} s"])
    ex_rows = [[name, e["graphs"], e["graph_breaks"], "; ".join(e["reasons"])[:160]]
               for name, e in results["explain"].items()]
    img32 = results["image"][32]
    md = "\n".join([
        f"## torch.compile (inductor, eval, {info['dtype']})",
        "",
        f"Machine: {machine_line(info)}. Matmul peak {peak:.0f} GFLOP/s. {reps} rounds"
        + (" (--quick)" if args.quick else "") + ".",
        "",
        "Graph breaks (`torch._dynamo.explain`):",
        "",
        md_table(["model", "graphs", "graph breaks", "reasons"], ex_rows),
        "",
        "Compiled throughput, ours / compiled dense twin (median of per-round ratios):",
        "",
        md_table(["model", "batch", "throughput ratio", "% of matmul peak (ours / dense)", "compile time"], rows),
        "",
        f"- compiled Mobile V-MoE-Tiny, batch 32: **{100 * img32['fraction_of_peak']:.0f}%** of matmul peak — goal "
        f"{goal(img32['fraction_of_peak'], 0.70)}",
    ])
    write_results("compile", results, md)
    return results


if __name__ == "__main__":
    main()
