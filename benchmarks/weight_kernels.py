"""Weight kernels on SmolLM2-135M's real matrices: kvserve's q4q8 / q8q8 against the ATen forms.

    flock -x /tmp/cpu.lock python -m benchmarks.weight_kernels [--rows 1,2,4,8,16,32,64,128]
                                                               [--threads 1,2] [--budget 0.6]

The body is the checkpoint's 210 Q4_1 linears as the model runs them, fused into 150 matrices
(wq, wk+wv, wo, w1+w3, w2 per layer); the LM head is the Q8_0 token embedding (49152 x 576). Per row
count M and thread count: ms for one pass through all of them (the best pass within `budget`
seconds, at least 3), for each form: q4q8 / q8q8 (this repo's kernels, float32 activations),
q4 (ATen int4, bfloat16 activations) and int8 (ATen, the head), fp16 (fbgemm), dense float32, and
dense bfloat16 where the CPU has bf16 units. GB/s at M = 1 is the form's bytes over the time.
Prints markdown (BENCHMARKS.md's "Weight kernels" section). Not asserted anywhere.
"""
from __future__ import annotations

import argparse
import time

import torch

from model import kernels
from model.dtypes import cpu_has_bf16, cpu_summary
from model.gguf_loader import open_gguf
from model.kernel_forms import Q4Q8Form, Q8Q8Form
from model.loader import smollm2_gguf_path
from model.quantized import Q4Weight, Q8Weight, WeightT, cat_rows, dequantize, quantize_int8_rows
from model.weight_forms import DenseForm, Fp16Form, Int8Form, Q4Form, WeightForm


def body_matrices(weights: dict[str, WeightT]) -> list[WeightT]:
    out = []
    for i in range(len({k.split(".")[1] for k in weights if k.startswith("layers.")})):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        out += [weights[a + "wq.weight"], cat_rows([weights[a + "wk.weight"], weights[a + "wv.weight"]]),
                weights[a + "wo.weight"], cat_rows([weights[f + "w1.weight"], weights[f + "w3.weight"]]),
                weights[f + "w2.weight"]]
    return out


def make_forms(matrices: list[WeightT], head: bool) -> dict[str, list[WeightForm]]:
    dense = [dequantize(w) for w in matrices]
    forms: dict[str, list[WeightForm]] = {}
    if head:
        forms["q8q8"] = [Q8Q8Form(w) for w in matrices if isinstance(w, Q8Weight)]
        forms["int8 (ATen, bf16 acts)"] = [Int8Form(quantize_int8_rows(w)) for w in dense]
    else:
        forms["q4q8"] = [Q4Q8Form(w) for w in matrices if isinstance(w, Q4Weight)]
        forms["q4 (ATen int4, bf16 acts)"] = [Q4Form(w) for w in matrices if isinstance(w, Q4Weight)]
    forms["fp16 (fbgemm)"] = [Fp16Form(w) for w in dense]
    forms["dense fp32"] = [DenseForm(w) for w in dense]
    if cpu_has_bf16():
        forms["dense bf16"] = [DenseForm(w.bfloat16()) for w in dense]
    return forms


def best_pass(forms: list[WeightForm], rows: int, budget: float) -> float:
    inputs = [torch.randn(rows, f.shape[1]) for f in forms]
    for f, x in zip(forms, inputs):  # warm-up
        f(x)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        for f, x in zip(forms, inputs):
            f(x)
        samples.append(time.perf_counter() - t0)
    return min(samples)


@torch.inference_mode()
def table(title: str, forms: dict[str, list[WeightForm]], rows: list[int], threads: list[int], budget: float) -> str:
    names = list(forms)
    mb = {name: sum(f.nbytes for f in fs) / 1e6 for name, fs in forms.items()}
    lines = [f"**{title}** ({len(next(iter(forms.values())))} matrices; MB: "
             + ", ".join(f"{n} {mb[n]:.0f}" for n in names) + ")", "",
             "| threads | M | " + " | ".join(f"{n} ms" for n in names) + " | fastest |",
             "|---:|---:|" + "---:|" * (len(names) + 1)]
    for t in threads:
        torch.set_num_threads(t)
        for m in rows:
            ms = {n: best_pass(fs, m, budget) * 1e3 for n, fs in forms.items()}
            cells = [f"{ms[n]:.2f}" + (f" ({mb[n] / ms[n]:.1f} GB/s)" if m == 1 else "") for n in names]
            lines.append(f"| {t} | {m} | " + " | ".join(cells) + f" | {min(ms, key=ms.__getitem__)} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per form and row count (at least 3 passes)")
    parser.add_argument("--parts", default="body,head", help="body, head or both")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"kvserve kernels unavailable: {kernels.unavailable_reason()}")
    rows = [int(r) for r in args.rows.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    weights = open_gguf(smollm2_gguf_path()).weights(progress=False)
    info = kernels.build_info()
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}; kernels: {info.get('simd_path')} path, "
          f"-march={info.get('march')}\n", flush=True)
    out = []
    if "body" in args.parts:
        out.append(table("Body: 210 Q4_1 linears", make_forms(body_matrices(weights), head=False), rows, threads, args.budget))
    if "head" in args.parts:
        out.append(table("LM head: Q8_0 49152 x 576", make_forms([weights["tok_embeddings.weight"]], head=True),
                         rows, threads, args.budget))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
