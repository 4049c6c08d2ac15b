"""Mutation check: break each method on purpose, one change at a time, and count how many
of the broken versions the tests catch.

Each mutation is a textual edit of one source file (a reducer, or the engine where a
method depends on it), made in a copy of the repository; the method's tests then run on
that copy. A mutation is *caught* when a test fails (or the run times out), and
*survives* when every selected test passes. The list covers an outside audit's broken
versions (issue 11) and more: lowest instead of highest, swapped or ignored temperatures,
dropped size weights, own cost zeroed, off-by-one counts, wrong argmax dimensions, dropped
normalisations. Every mutation's ``old`` text must occur exactly once in its file, so the
list cannot silently rot: a stale entry stops the run before anything else.

Usage::

    python benchmarks/mutations.py                 # all mutations
    python benchmarks/mutations.py --only dtem     # one method
    python benchmarks/mutations.py --list          # print the list, run nothing
    python benchmarks/mutations.py --suite         # also run the older per-method tests
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("analysis", "tests", "viz", "app_pages", "app.py", "pyproject.toml", "assets")
ANSWERS = "tests/test_method_answers.py"
OFFICIAL = "tests/test_official_fixtures.py"
SEED = "tests/test_seed_methods.py"
BASELINES = "tests/test_baselines.py"
SEED_METHODS = ("dtem", "cropr", "patchmerger", "ltm", "mstm")


@dataclass(frozen=True)
class Mutation:
    method: str  # dtem, cropr, patchmerger, ltm, mstm, or "baselines" (ToMe/EViT/shared)
    path: str
    old: str
    new: str
    what: str


DTEM = "analysis/reducers/dtem.py"
CROPR = "analysis/reducers/cropr.py"
PM = "analysis/reducers/patchmerger.py"
LTM = "analysis/reducers/ltm.py"
MSTM = "analysis/reducers/mstm.py"
ENGINE = "analysis/engine.py"
BASE = "analysis/reducers/base.py"
TOPK = "analysis/reducers/topk.py"
TOME = "analysis/reducers/tome.py"
EVIT = "analysis/reducers/evit.py"

MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------- DTEM
    Mutation(
        "dtem",
        DTEM,
        'self.values["tau1"],\n            self.values["tau2"],',
        'self.values["tau2"],\n            self.values["tau1"],',
        "training: τ1 and τ2 swapped (audit)",
    ),
    Mutation("dtem", DTEM, "logits = values / tau1", "logits = values", "τ1 ignored (audit)"),
    Mutation(
        "dtem",
        DTEM,
        'self.values["tau1"],\n            self.values["tau2"],',
        'self.values["tau1"],\n            self.values["tau1"],',
        "training: τ1 used for τ2 (one temperature ignored)",
    ),
    Mutation(
        "dtem",
        DTEM,
        'self.values["k2"],',
        "3,",
        "training: k2 fixed at its default",
    ),
    Mutation(
        "dtem",
        DTEM,
        "k2: int, tau1: float, tau2: float) -> Tensor:",
        "k2: int, tau2: float, tau1: float) -> Tensor:",
        "soft top-r: τ1 and τ2 swapped in its signature",
    ),
    Mutation(
        "dtem",
        DTEM,
        "reshape(batch, -1) / tau2, dim=-1)",
        "reshape(batch, -1), dim=-1)",
        "τ2 ignored (audit)",
    ),
    Mutation(
        "dtem",
        DTEM,
        "moved = assign.transpose(-1, -2) @ (sa.unsqueeze(-1) * xa)",
        "moved = assign.transpose(-1, -2) @ xa",
        "training merge: A tokens not weighted by size (audit)",
    ),
    Mutation(
        "dtem",
        DTEM,
        "xb = (sb.unsqueeze(-1) * xb + moved)",
        "xb = (xb + moved)",
        "training merge: B tokens not weighted by size",
    ),
    Mutation(
        "dtem",
        DTEM,
        "sb_new = sb + (assign.transpose(-1, -2) @ sa.unsqueeze(-1)).squeeze(-1)",
        "sb_new = sb + assign.sum(dim=1)",
        "training merge: B sizes grow by the assignment, not by the sizes",
    ),
    Mutation(
        "dtem",
        DTEM,
        "sa = sa * (rest + (rest.clamp(0.0, 1.0) - rest).detach())",
        "sa = sa",
        "training merge: merged A tokens do not fade",
    ),
    Mutation(
        "dtem",
        DTEM,
        "logits = logits + remaining.log()",
        "logits = logits",
        "soft top-r: no log(1 − row mass) after a round",
    ),
    Mutation(
        "dtem", DTEM, "chosen = chosen / over", "chosen = chosen", "soft top-r: rows not clipped"
    ),
    Mutation("dtem", DTEM, "k2 = min(k2, num_b)", "k2 = num_b", "soft top-r: k2 ignored"),
    Mutation(
        "dtem",
        DTEM,
        "values, index = scores.topk(k2, dim=-1)",
        "values, index = scores.topk(k2, dim=-1, largest=False)",
        "soft top-r: the k2 least similar candidates",
    ),
    Mutation(
        "dtem",
        DTEM,
        "self.module(signals.block_input.detach())",
        "self.module(signals.block_input)",
        "training: metric input not detached",
    ),
    Mutation(
        "dtem",
        DTEM,
        "metric = metric / metric.norm(dim=-1, keepdim=True)\n"
        "        x, size = state.x, state.size",
        "x, size = state.x, state.size",
        "training: metric not normalised (dot product, not cosine)",
    ),
    Mutation(
        "dtem",
        DTEM,
        "merged_size.argsort(dim=-1, descending=True)",
        "merged_size.argsort(dim=-1, descending=False)",
        "training: tokens sorted by ascending size",
    ),
    Mutation(
        "dtem",
        DTEM,
        'ctx.scratch["dtem_active"] = active - r',
        'ctx.scratch["dtem_active"] = active',
        "training: the active count does not shrink",
    ),
    Mutation(
        "dtem",
        DTEM,
        'r = min(self.values["r"], (active - prefix) // 2)',
        'r = min(self.values["r"], (active - prefix + 1) // 2)',
        "training: r capped one too high (off by one)",
    ),
    Mutation("dtem", DTEM, "return metric + matching", "return 0", "own cost zero"),
    Mutation(
        "dtem", DTEM, "return metric + matching", "return matching", "own cost without the metric"
    ),
    Mutation(
        "dtem",
        DTEM,
        "    proportional_attention: ClassVar[bool] = True\n    strength",
        "    proportional_attention: ClassVar[bool] = False\n    strength",
        "no proportional attention",
    ),
    Mutation(
        "dtem",
        ENGINE,
        "mask = (size + 1e-6).log()",
        "mask = size.clamp(min=1e-6).log()",
        "engine: log size clamped (a zero size loses its gradient; issue 11 §2)",
    ),
    Mutation(
        "dtem",
        ENGINE,
        "mask = (size + 1e-6).log().to(x.dtype)[:, None, None, :]",
        "mask = None",
        "engine: proportional attention dropped",
    ),
    Mutation(
        "dtem",
        TOME,
        "metric = metric / metric.norm(dim=-1, keepdim=True)\n    scores =",
        "scores =",
        "inference matching on the dot product, not the cosine",
    ),
    # ---------------------------------------------------------------- Cropr
    Mutation(
        "cropr",
        CROPR,
        "kept = topk_patch_indices(scores, keep, prefix)",
        "kept = topk_patch_indices(-scores, keep, prefix)",
        "prunes its highest-scoring tokens (audit)",
    ),
    Mutation(
        "cropr",
        CROPR,
        "return (num_tokens - facts.num_prefix) * facts.dim",
        "return 0",
        "own cost zero (audit)",
    ),
    Mutation(
        "cropr",
        CROPR,
        'extra = self.values["first_extra"] if self.values.get("first", False) else 0',
        "extra = 0",
        "the first module prunes rate, not rate + 1",
    ),
    Mutation(
        "cropr",
        CROPR,
        "return max(1, patches - self._rate()) if patches > 0 else 0",
        "return max(1, patches - self._rate() + 1) if patches > 0 else 0",
        "keeps one token too many (off by one)",
    ),
    Mutation(
        "cropr",
        CROPR,
        "self.module.predict(state.x.detach())",
        "self.module.predict(state.x)",
        "auxiliary loss reaches the backbone (no detach)",
    ),
    Mutation(
        "cropr",
        CROPR,
        "F.softmax(self.scores(x).float() / math.sqrt(x.shape[-1]), dim=-1)",
        "F.softmax(self.scores(x).float(), dim=-1)",
        "auxiliary attention without its D^-½ scale",
    ),
    Mutation(
        "cropr",
        CROPR,
        "F.softmax(self.scores(x).float() / math.sqrt(x.shape[-1]), dim=-1)",
        "F.softmax(self.scores(x).float() / math.sqrt(x.shape[-1]), dim=0)",
        "auxiliary attention softmax over the batch",
    ),
    Mutation(
        "cropr",
        CROPR,
        "pooled = pooled + self.mlp(self.mlp_norm(pooled))",
        "pooled = self.mlp(self.mlp_norm(pooled))",
        "auxiliary MLP without its residual",
    ),
    Mutation(
        "cropr",
        CROPR,
        "return x @ self.query.to(x.dtype)",
        "return x @ self.query.to(x.dtype) / math.sqrt(x.shape[-1])",
        "score scaled by D^-½ (the official score is unscaled)",
    ),
    Mutation(
        "cropr",
        CROPR,
        'return bool(self.values["llf"])',
        "return False",
        "last-layer fusion ignored",
    ),
    Mutation(
        "cropr",
        BASE,
        "best = scores.topk(keep, dim=1, largest=True, sorted=True).indices",
        "best = scores.topk(keep, dim=1, largest=False, sorted=True).indices",
        "shared top-k keeps the lowest scores",
    ),
    # ---------------------------------------------------------------- PatchMerger
    Mutation(
        "patchmerger",
        PM,
        'return 2 * self.values["tokens"] * patches * facts.dim',
        "return 0",
        "own cost zero (audit)",
    ),
    Mutation(
        "patchmerger",
        PM,
        "normed.transpose(-1, -2)).softmax(dim=-1)",
        "normed.transpose(-1, -2)).softmax(dim=1)",
        "softmax over the M outputs, not the N patches",
    ),
    Mutation(
        "patchmerger",
        PM,
        "normed = self.norm(patches)",
        "normed = patches",
        "no LayerNorm",
    ),
    Mutation(
        "patchmerger",
        PM,
        "return assign @ normed, assign",
        "return assign @ patches, assign",
        "pools the un-normalised tokens",
    ),
    Mutation(
        "patchmerger",
        PM,
        "(self.queries.to(normed.dtype) @ normed.transpose(-1, -2))",
        "(self.queries.to(normed.dtype) @ normed.transpose(-1, -2) / math.sqrt(normed.shape[-1]))",
        "logits scaled by D^-½ (the figure has none)",
    ),
    Mutation(
        "patchmerger",
        PM,
        "owner = assign.argmax(dim=1)",
        "owner = assign.argmin(dim=1)",
        "hard segments: the output weighing a patch least",
    ),
    Mutation(
        "patchmerger",
        PM,
        "1, owner, state.size[:, prefix:]",
        "1, owner, torch.ones_like(state.size[:, prefix:])",
        "output sizes count tokens, not the patches they carry",
    ),
    Mutation(
        "patchmerger",
        PM,
        "if patches <= tokens:\n            return identity_reduction(state)",
        "if patches < tokens:\n            return identity_reduction(state)",
        "merges M patches into M (off by one)",
    ),
    # ---------------------------------------------------------------- LTM
    Mutation(
        "ltm",
        LTM,
        "targets = scores.topk(keep, dim=1).indices",
        "targets = scores.topk(keep, dim=1, largest=False).indices",
        "merges into its lowest-scored tokens (audit)",
    ),
    Mutation(
        "ltm",
        LTM,
        "return patches * facts.dim + patches * patches * facts.dim",
        "return 0",
        "own cost zero (audit)",
    ),
    Mutation(
        "ltm",
        LTM,
        "scores = scores - self.redundancy_weight * redundancy",
        "scores = scores + self.redundancy_weight * redundancy",
        "redundancy term with the wrong sign",
    ),
    Mutation(
        "ltm",
        LTM,
        "scores = scores + self.size_weight * size.float().clamp(min=1e-6).log()",
        "scores = scores",
        "score ignores the previous mask's sizes",
    ),
    Mutation(
        "ltm",
        LTM,
        "redundancy = similarity.masked_fill(eye, -1.0).amax(dim=-1)",
        "redundancy = similarity.amax(dim=-1)",
        "redundancy counts a token's similarity to itself",
    ),
    Mutation(
        "ltm",
        LTM,
        "logits = similarity.gather(2, columns) / self.log_tau.exp()",
        "logits = similarity.gather(2, columns)",
        "no temperature τ",
    ),
    Mutation(
        "ltm",
        LTM,
        "logits = logits + scores.gather(1, targets).unsqueeze(1)",
        "logits = logits",
        "rows ignore the targets' scores",
    ),
    Mutation(
        "ltm",
        LTM,
        "assign = logits.argmax(dim=-1).scatter(1, targets, own)",
        "assign = logits.argmax(dim=-1)",
        "inference: a target does not keep itself",
    ),
    Mutation(
        "ltm",
        LTM,
        "assign = logits.argmax(dim=-1).scatter(1, targets, own)",
        "assign = logits.argmin(dim=-1).scatter(1, targets, own)",
        "inference: merges into the least similar target",
    ),
    Mutation(
        "ltm",
        LTM,
        "mask = mask.scatter(1, index, F.one_hot(own, keep).to(mask.dtype))",
        "mask = mask",
        "training: a target does not keep itself",
    ),
    Mutation(
        "ltm",
        LTM,
        "mask = logits.softmax(dim=-1)",
        "mask = logits.softmax(dim=1)",
        "training: softmax over the tokens, not the targets",
    ),
    Mutation(
        "ltm",
        LTM,
        "weight = size * importance.clamp(min=1e-6)",
        "weight = importance.clamp(min=1e-6)",
        "merge not weighted by size",
    ),
    Mutation(
        "ltm",
        LTM,
        "weight = size * importance.clamp(min=1e-6)",
        "weight = size",
        "merge not weighted by importance",
    ),
    Mutation(
        "ltm",
        LTM,
        "new_size = (mask * size.unsqueeze(-1)).sum(dim=1)",
        "new_size = mask.sum(dim=1)",
        "training: new sizes count tokens, not patches",
    ),
    Mutation(
        "ltm",
        LTM,
        "new_size = size.new_zeros(batch, keep).scatter_add_(1, assign, size)",
        "new_size = size.new_zeros(batch, keep).scatter_add_(1, assign, torch.ones_like(size))",
        "inference: new sizes count tokens, not patches",
    ),
    Mutation(
        "ltm",
        LTM,
        "worst = best.topk(count, dim=1, largest=False).indices",
        "worst = best.topk(count, dim=1, largest=True).indices",
        "discard drops the best-fitting tokens",
    ),
    Mutation(
        "ltm",
        TOPK,
        "return max(1, min(num_patches, math.ceil(keep * num_patches)))",
        "return max(1, min(num_patches, math.floor(keep * num_patches)))",
        "shared kept count ⌊keep·N⌋, not ⌈keep·N⌉",
    ),
    # ---------------------------------------------------------------- MSTM
    Mutation(
        "mstm",
        MSTM,
        "crucial = importance.topk(keep, dim=1).indices",
        "crucial = importance.topk(keep, dim=1, largest=False).indices",
        "keeps the lowest CLS attention (audit)",
    ),
    Mutation(
        "mstm",
        MSTM,
        "nearest = (other_keys @ crucial_keys.transpose(-1, -2)).argmax(dim=-1)",
        "nearest = (other_keys @ crucial_keys.transpose(-1, -2)).argmin(dim=-1)",
        "merges into the least similar kept token (audit)",
    ),
    Mutation(
        "mstm",
        MSTM,
        "keys = F.normalize(signals.keys[:, prefix:].float(), dim=-1)",
        "keys = signals.keys[:, prefix:].float()",
        "similarity on the dot product, not the cosine",
    ),
    Mutation(
        "mstm",
        MSTM,
        "crucial = importance.topk(keep, dim=1).indices.sort(dim=1).values",
        "crucial = importance.topk(keep, dim=1).indices",
        "crucial tokens ordered by importance, not by index",
    ),
    Mutation("mstm", MSTM, "        return macs\n", "        return 0\n", "own cost zero"),
    Mutation(
        "mstm",
        MSTM,
        "macs += num_tokens * facts.dim + (patches - keep) * keep * head_dim",
        "macs += (patches - keep) * keep * head_dim",
        "own cost without the CLS attention row",
    ),
    Mutation(
        "mstm",
        MSTM,
        "macs += num_tokens * facts.dim + (patches - keep) * keep * head_dim",
        "macs += num_tokens * facts.dim + patches * keep * head_dim",
        "own cost counts every row of the similarity",
    ),
    Mutation(
        "mstm",
        MSTM,
        'return bool(self.values["ms"]) and bool(self.values.get("first", False))',
        'return bool(self.values["ms"])',
        "multi-scale fusion at every layer of the part",
    ),
    Mutation(
        "mstm",
        BASE,
        "weighted = state.x.to(work) * size.unsqueeze(-1)",
        "weighted = state.x.to(work) * size.unsqueeze(-1).sign()",
        "shared merge: tokens summed without their sizes",
    ),
    Mutation(
        "mstm",
        BASE,
        "new_size = size.new_zeros(batch, num_out).scatter_add_(1, token_map, size)",
        "new_size = size.new_zeros(batch, num_out).scatter_add_(1, token_map, size.sign())",
        "shared merge: new sizes count tokens, not patches",
    ),
    # ---------------------------------------------------------------- ToMe, EViT
    Mutation(
        "baselines",
        TOME,
        "edge_order = node_max.argsort(dim=-1, descending=True)",
        "edge_order = node_max.argsort(dim=-1, descending=False)",
        "ToMe merges its least similar pairs",
    ),
    Mutation(
        "baselines",
        TOME,
        "    scores[:, :prefix_a, :] = -torch.inf\n",
        "",
        "ToMe: protected A tokens may merge",
    ),
    Mutation(
        "baselines",
        EVIT,
        "fused_x = (weights.unsqueeze(-1) * state.x).sum(dim=1, keepdim=True)",
        "fused_x = (dropped.unsqueeze(-1) * state.x).sum(dim=1, keepdim=True)",
        "EViT fuses without the attention weights",
    ),
)


def tests_for(method: str, suite: bool) -> list[str]:
    """The pytest arguments that test one method (fast: the new answer and parity tests)."""
    if method == "baselines":
        return [BASELINES, ANSWERS]
    files = [ANSWERS, OFFICIAL] + ([SEED] if suite else [])
    return [*files, "-k", f"{method} and not shipped"]


def check_texts(mutations: tuple[Mutation, ...]) -> list[str]:
    """Every mutation's old text must occur exactly once in today's file."""
    problems = []
    for mutation in mutations:
        text = (ROOT / mutation.path).read_text(encoding="utf-8")
        count = text.count(mutation.old)
        if count != 1:
            problems.append(
                f"{mutation.path}: {mutation.what!r}: old text found {count} times:\n"
                f"    {mutation.old!r}"
            )
        if mutation.old == mutation.new:
            problems.append(f"{mutation.path}: {mutation.what!r}: old and new are the same")
    return problems


def copy_repo(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, target / name)


def run_tests(workdir: Path, args: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, the first failure's name or a short reason)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode between mutants
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    for line in done.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return False, line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ")
    return False, f"pytest exit {done.returncode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only this method's mutations (dtem, cropr, ...)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument(
        "--suite", action="store_true", help="also run tests/test_seed_methods.py per method"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    args = parser.parse_args(argv)

    chosen = tuple(m for m in MUTATIONS if args.only in (None, m.method))
    if not chosen:
        parser.error(f"no mutations for {args.only!r}")
    problems = check_texts(chosen)
    if problems:
        print("stale mutations (the source changed; update benchmarks/mutations.py):")
        print("\n".join(problems))
        return 2
    if args.list:
        for index, mutation in enumerate(chosen, 1):
            print(f"{index:3d}  {mutation.method:12s} {mutation.path:34s} {mutation.what}")
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenscope-mutants-") as folder:
        workdir = Path(folder)
        copy_repo(workdir)
        selections = {m.method: tests_for(m.method, args.suite) for m in chosen}
        for method, selection in selections.items():  # the unbroken code must pass
            passed, reason = run_tests(workdir, selection, args.timeout)
            if not passed:
                print(f"the unmutated code fails the {method} tests ({reason}); stopping")
                return 2
        rows = []
        for index, mutation in enumerate(chosen, 1):
            path = workdir / mutation.path
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(mutation.old, mutation.new, 1), encoding="utf-8")
            try:
                passed, reason = run_tests(workdir, selections[mutation.method], args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            status = "survived" if passed else "caught"
            rows.append((mutation, status, reason))
            print(f"{index:3d}/{len(chosen)} {status:8s} {mutation.method:11s} {mutation.what}")
            if reason:
                print(f"{'':13s}by {reason}")
            sys.stdout.flush()

    caught = sum(status == "caught" for _, status, _ in rows)
    print()
    print("| method | mutation | file | result |")
    print("|---|---|---|---|")
    for mutation, status, _ in rows:
        print(f"| {mutation.method} | {mutation.what} | `{mutation.path}` | {status} |")
    survivors = [m for m, status, _ in rows if status == "survived"]
    print()
    for mutation in survivors:
        print(f"SURVIVED: {mutation.method}: {mutation.what} ({mutation.path})")
    seconds = time.perf_counter() - started
    print(f"caught {caught} of {len(rows)} ({seconds:.0f} s)")
    return 0 if not survivors else 1


if __name__ == "__main__":
    raise SystemExit(main())
