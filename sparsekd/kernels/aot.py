"""Compile every kernel specialisation the launchers can produce, ahead of time, for CUDA
targets, on a machine without a GPU (Triton's own ptxas), and report registers and spills.

    python -m sparsekd.kernels.aot [--arch 80 --arch 90] [--json]

Specialisations: `_sparse_kl_fwd_kernel` for every divergence x every support block
(2 ... MAX_BLOCK_S) x the vocabulary block of each vocabulary in VOCABS;
`_sample_fwd_kernel` for the vocabulary block of each vocabulary. Resource usage comes
from `cuobjdump --dump-resource-usage` (shipped with Triton): REG registers per thread,
LOCAL bytes of local memory per thread (spills), SHARED bytes per block.

Run it without TRITON_INTERPRET (the interpreter replaces the kernels); the test suite
starts it in a subprocess. Block sizes are the compiled launchers' (COMPILED_* constants).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

VOCABS = (32_000, 49_152, 128_256, 151_936, 201_088)
ARCHS = (80, 90)


@dataclass(frozen=True)
class Spec:
    kernel: str
    constexprs: dict  # printable constexpr values (functions by name)
    vocabs: tuple  # the vocabularies that produce this specialisation


@dataclass
class Resources:
    kernel: str
    arch: int
    constexprs: dict
    vocabs: tuple
    num_warps: int
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    seconds: float


def specialisations() -> list[tuple[Spec, object, dict, dict]]:
    """(spec, kernel, signature, constexprs) for every specialisation, as each kernel's own
    module lists them (`aot_targets`)."""
    from sparsekd.kernels import sparse_kl, teacher_head

    out = []
    for module in (sparse_kl, teacher_head):
        for name, shown, vocabs, kernel, signature, constexprs in module.aot_targets(VOCABS):
            out.append((Spec(name, shown, tuple(vocabs)), kernel, signature, constexprs))
    return out


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(spec: Spec, kernel, signature: dict, constexprs: dict, arch: int) -> Resources:
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True
        ).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return Resources(
        kernel=spec.kernel,
        arch=arch,
        constexprs=spec.constexprs,
        vocabs=spec.vocabs,
        num_warps=compiled.metadata.num_warps,
        registers=field("REG"),
        local_bytes=field("LOCAL"),
        stack_bytes=field("STACK"),
        shared_bytes=field("SHARED"),
        seconds=round(seconds, 3),
    )


def compile_all(archs=ARCHS) -> list[Resources]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    return [compile_one(*s, arch) for arch in archs for s in specialisations()]


def markdown(results: list[Resources]) -> str:
    import triton

    lines = [
        f"Triton {triton.__version__}, {len(results)} compilations "
        f"({sum(r.seconds for r in results):.0f} s), num_warps 4.",
        "",
        "| kernel | sm | constexprs | vocabularies | registers | local (spill) B | shared B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ce = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        vocabs = ", ".join(f"{v:,}" for v in r.vocabs)
        lines.append(
            f"| {r.kernel} | {r.arch} | {ce} | {vocabs} | {r.registers} | {r.local_bytes} | "
            f"{r.shared_bytes} |"
        )
    spills = sum(r.local_bytes + r.stack_bytes for r in results)
    lines += ["", f"Total spill (local + stack) bytes: {spills}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="sm_XX (default 80 and 90)")
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table on stdout")
    args = ap.parse_args(argv)
    results = compile_all(tuple(args.arch or ARCHS))
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    elif args.markdown:
        print(markdown(results))
    else:
        for r in results:
            print(
                f"sm_{r.arch} {r.kernel} {r.constexprs}: {r.registers} regs, "
                f"{r.local_bytes} B local, {r.shared_bytes} B shared"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
