"""Peak memory of inference and of one training step (forward + backward + AdamW), batch 32, 224 px, fp32, against
the dense twin.

tracemalloc does not see torch's allocations, so each (model, mode) runs in a fresh subprocess and reports the
growth of its peak resident set size (`resource.getrusage(...).ru_maxrss`) over the run: peak RSS after the
run minus RSS once the model, optimizer and inputs exist. Parameters are counted separately.

    python benchmarks/bench_memory.py [--quick]
"""

import argparse
import json
import subprocess
import sys

from common import md_table, machine_info, machine_line, write_results

MODELS = {
    "image": ("vmoe_image", "vit"),
    "token": ("vmoe_token_eager", "vit_mlp1536"),
}


def child(name: str, mode: str, batch: int) -> dict:
    import resource

    import torch

    from common import dense_vit, image_config, pixels, token_config, vmoe

    builders = {
        "vmoe_image": lambda: vmoe(image_config()),
        "vit": lambda: dense_vit(768),
        "vmoe_token_eager": lambda: vmoe(token_config()),
        "vit_mlp1536": lambda: dense_vit(1536),
    }
    model = builders[name]()
    x = pixels(batch)
    labels = torch.zeros(batch, dtype=torch.long)
    params = sum(p.numel() * p.element_size() for p in model.parameters())

    def rss_kib():  # current RSS from /proc (Linux); falls back to the peak
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if mode == "inference":
        model.eval()
        base = rss_kib()
        with torch.inference_mode():
            model(x)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        base = rss_kib()
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": name, "mode": mode, "batch": batch, "param_mib": params / 2**20,
            "rss_before_mib": base / 1024, "peak_growth_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return None
    batch = args.batch or (8 if args.quick else 32)
    results = {"machine": machine_info(), "batch": batch, "runs": []}
    for group, names in MODELS.items():
        for mode in ("inference", "train"):
            for name in names:
                proc = subprocess.run([sys.executable, __file__, "--child", name, mode, str(batch)],
                                      capture_output=True, text=True, check=True)
                line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
                results["runs"].append({"group": group, **json.loads(line[len("RESULT "):])})
    rows = []
    for group, (ours, ref) in MODELS.items():
        for mode in ("inference", "train"):
            a = next(r for r in results["runs"] if r["model"] == ours and r["mode"] == mode)
            b = next(r for r in results["runs"] if r["model"] == ref and r["mode"] == mode)
            ratio = a["peak_growth_mib"] / b["peak_growth_mib"]
            results[f"{group}_{mode}_ratio"] = ratio
            # training: grads + AdamW's two moments are 3 x params; the rest is activations and temporaries
            state = 3 if mode == "train" else 0
            act_a = a["peak_growth_mib"] - state * a["param_mib"]
            act_b = b["peak_growth_mib"] - state * b["param_mib"]
            results[f"{group}_{mode}_activation_ratio"] = act_a / act_b
            rows.append([group, mode, ours, f"{a['param_mib']:.1f}", f"{a['peak_growth_mib']:.0f}", ref,
                         f"{b['param_mib']:.1f}", f"{b['peak_growth_mib']:.0f}", f"{ratio:.2f}",
                         f"{act_a / act_b:.2f}"])
    md = "\n".join([
        f"## Peak memory, batch {batch}, fp32",
        "",
        f"Machine: {machine_line(results['machine'])}. Fresh subprocess per (model, mode); activation memory = "
        "growth of peak RSS during one inference forward / one training step (AdamW state included).",
        "",
        md_table(["routing", "mode", "MoE model", "params MiB", "peak growth MiB", "dense twin", "params MiB",
                  "peak growth MiB", "ratio", "ratio without 3 x params (train)"], rows),
        "",
        "A training step also holds gradients and AdamW's two moments (3 x params, plus foreach temporaries): the "
        "MoE models carry E experts' parameters, so their training memory grows with the total, not the active, "
        "parameter count. The last column removes 3 x params to compare the activation memory.",
    ])
    write_results("memory", results, md)
    return results


if __name__ == "__main__":
    main()
