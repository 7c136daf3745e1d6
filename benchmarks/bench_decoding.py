"""Decoding methods on CPU: beam search vs transformers, speculative and prompt-lookup decoding vs
the target model alone.

    python -m benchmarks.bench_decoding beams [--threads 2]
    python -m benchmarks.bench_decoding linears [--threads 2]
    python -m benchmarks.bench_decoding speculative --target runs/target-char --draft runs/draft-char runs/draft2-char
    python -m benchmarks.bench_decoding lookup --target runs/target-char

The trained models (`runs/target-char` is the shakespeare-char recipe trained for 2,000 steps; the
drafts are 1 x 64 and 2 x 128 models of the same recipe) come from `benchmarks/decoding_models.sh`.

beams: `beam_search` vs transformers `generate(num_beams=4)` on the same weights (attnkit's model
exported to the transformers class), fp32, one prompt per call, sentences/s; the tokens of every
hypothesis are compared. speculative: greedy decoding of a trained target alone vs with a much
smaller draft trained on the same text, on held-out prompts: tokens/s, the draft's acceptance
rate, and whether the tokens are identical. lookup: prompt-lookup drafting on a passage the model
is asked to repeat. Every comparison runs its variants interleaved, best of several rounds.
"""

from __future__ import annotations

import argparse
import time

import torch

from attnkit.checkpoints import load_checkpoint
from attnkit.config import preset
from attnkit.data.text import load_text
from attnkit.generate import Beams, Sampling, Speculation, beam_search, generate_tokens
from attnkit.models.decoder import DecoderLM
from benchmarks.bench_generate import hf_twin
from benchmarks.common import limits_line, machine_limits, set_threads, table, write_section


def tagged(args, sep: str = "-") -> str:
    """``--tag``'s suffix for section names, titles and commands: results from another machine stay beside
    the others instead of replacing them."""
    return f"{sep}{args.tag}" if args.tag else ""


def best_times(fns: dict, rounds: int) -> dict:
    """Best wall seconds of each fn over ``rounds`` rounds, the fns interleaved in every round."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# --- beam search vs transformers ---------------------------------------------------------------------

def bench_beams(args) -> None:
    limits = machine_limits()
    rows, notes = [], []
    settings = dict(num_beams=4, length_penalty=0.8, early_stopping=True, no_repeat_ngram_size=3)
    for name, overrides in (("gpt2-char-small", dict(vocab_size=65)), ("smollm2-135m", {})):
        torch.manual_seed(0)
        model = DecoderLM(preset(name, **overrides)).eval()
        model.reset_parameters(std=0.1)  # peaked distributions, so beams differ and end tokens happen
        hf = hf_twin(model)
        eos = 3
        hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = eos
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(4, model.cfg.vocab_size, (16,), generator=g).tolist() for _ in range(args.prompts)]
        results = {}

        def ours():
            results["ours"] = [beam_search(model, [p], beams=Beams(**settings), max_new_tokens=args.new_tokens,
                                           eos_ids=[eos], pad_id=eos)[0][0][0] for p in prompts]

        def compiled():
            results["compiled"] = [beam_search(model, [p], beams=Beams(**settings), max_new_tokens=args.new_tokens,
                                               eos_ids=[eos], pad_id=eos, compile=True)[0][0][0] for p in prompts]

        def theirs():
            out = []
            for p in prompts:
                with torch.inference_mode():
                    ids = hf.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, do_sample=False,
                                      **settings)[0, len(p):].tolist()
                out.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
            results["theirs"] = out

        seconds = best_times({"attnkit": ours, "compiled": compiled, "transformers": theirs}, args.rounds)
        same = sum(a == b for a, b in zip(results["ours"], results["theirs"]))
        same_compiled = sum(a == b for a, b in zip(results["compiled"], results["ours"]))
        lengths = [len(r) for r in results["ours"]]
        n = len(prompts)
        rows.append([name, f"{n / seconds['attnkit']:.2f}", f"{n / seconds['compiled']:.2f}",
                     f"{n / seconds['transformers']:.2f}", f"**{seconds['transformers'] / seconds['attnkit']:.2f}x**",
                     f"**{seconds['transformers'] / seconds['compiled']:.2f}x**", f"{same}/{n}, {same_compiled}/{n}",
                     f"{min(lengths)}-{max(lengths)}"])
        print(rows[-1], flush=True)
    body = (
        f"{limits_line(limits)}\n\n"
        f"Beam search, {settings} , up to {args.new_tokens} new tokens, {args.prompts} prompts of 16 tokens, "
        "one prompt per call, fp32, random weights (N(0, 0.1): peaked next-token distributions) exported to the "
        "transformers class (`generate(num_beams=4, ...)`, sdpa attention). Best of "
        f"{args.rounds} interleaved rounds. attnkit runs the prompt once and reorders its cache; transformers "
        "runs the prompt once per beam. `--compile`: the one-step graph for 4 rows (compiled in the warm-up).\n\n"
        + table(["model", "attnkit sentences/s", "attnkit --compile sentences/s", "transformers sentences/s",
                 "ratio", "ratio, --compile", "same best hypothesis: vs transformers, compiled vs eager",
                 "best hypothesis length"], rows)
    )
    write_section(f"decoding-beams{tagged(args)}",
                  f"Beam search: attnkit vs transformers generate ({args.threads} threads{tagged(args, ', ')})", body,
                  f"python -m benchmarks.bench_decoding beams --threads {args.threads}{tagged(args, ' --tag ')}")


# --- the linears of a decode step: attnkit.kernels.linear (as routed) vs torch's F.linear --------------

def bench_linears(args) -> None:
    """GB/s of weights read by ``kernels.linear`` (the native kernel where kernels.py routes there, else
    F.linear) and by F.linear, for 1-8 rows of activations, interleaved medians. Enough copies of each
    matrix to fill 64 MB, so the weights come from memory as they do in decoding."""
    import statistics

    from attnkit import kernels

    limits = machine_limits()
    kernels.native_available()
    counts = (1, 2, 3, 4, 8)
    rows = []
    for N, K in ((384, 384), (576, 576), (1536, 576), (576, 1536), (49152, 576)):
        weights = [torch.randn(N, K) for _ in range(max(1, (64 << 20) // (N * K * 4)))]
        gb = sum(w.numel() for w in weights) * 4 / 1e9
        cells = [f"{N}x{K}"]
        for m in counts:
            x = torch.randn(m, K)
            fns = {"attnkit": lambda: [kernels.linear(x, w) for w in weights],
                   "torch": lambda: [torch.nn.functional.linear(x, w) for w in weights]}
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for fn in fns.values():
                    fn()
                for _ in range(args.rounds * 5):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
            ours, theirs = (statistics.median(times[name]) for name in ("attnkit", "torch"))
            cells.append(f"{gb / theirs:.1f} -> {gb / ours:.1f} ({theirs / ours:.2f}x)")
        rows.append(cells)
        print(cells, flush=True)
    body = (
        f"{limits_line(limits)}\n\nNative kernels: {kernels.native_status()}.\n\n"
        "fp32 `y = x @ W.T` for 1-8 rows of x (batch-1 decoding, beam search, checking draft tokens), no bias. "
        "GB/s of weights read, torch's `F.linear` -> `attnkit.kernels.linear` (the native kernel where kernels.py "
        "routes there, torch's op elsewhere), and the ratio; enough copies of each matrix to fill 64 MB, so the "
        f"weights come from memory; medians of {args.rounds * 5} interleaved calls.\n\n"
        + table(["weights"] + [f"{m} row{'s' if m > 1 else ''}" for m in counts], rows)
    )
    write_section(f"decoding-linears{tagged(args)}",
                  f"Decode-step linears: attnkit kernels vs torch ({args.threads} threads{tagged(args, ', ')})", body,
                  f"python -m benchmarks.bench_decoding linears --threads {args.threads}{tagged(args, ' --tag ')}")


# --- speculative decoding --------------------------------------------------------------------------

def held_out_prompts(n: int, length: int) -> list[str]:
    val = load_text("shakespeare")[1]
    step = len(val) // (n + 1)
    return [val[i * step: i * step + length] for i in range(1, n + 1)]


def timed_generation(model, prompts, new_tokens, speculation_factory, rounds):
    """{variant: (best seconds over all prompts, tokens, acceptance)} for each speculation variant."""
    results, stats = {}, {}

    def runner(name, make):
        def run():
            out, proposed, accepted = [], 0, 0
            for p in prompts:
                spec = make()
                out.append([int(t) for t, _ in generate_tokens(model, [p], max_new_tokens=new_tokens,
                                                               sampling=Sampling(temperature=0), speculation=spec)])
                if spec is not None:
                    proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
            results[name] = out
            stats[name] = accepted / proposed if proposed else float("nan")
        return run

    seconds = best_times({name: runner(name, make) for name, make in speculation_factory.items()}, rounds)
    return seconds, results, stats


def agreement(model, prompts, reference, other) -> str:
    """How many rows match the target alone token for token; where one does not, the target's own
    margin between its two best tokens at the first difference (a near-tie: fp32 sums in another order
    in the multi-token forward that checks a proposal, not a wrong acceptance)."""
    same, margins = 0, []
    for prompt, a, b in zip(prompts, reference, other):
        if a == b:
            same += 1
            continue
        i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + a[:i]]))[0, -1].float()
        top = logits.topk(2).values
        margins.append(f"token {i}: margin {float(top[0] - top[1]):.1e}")
    return f"{same}/{len(prompts)}" + (f" ({'; '.join(margins)})" if margins else "")


def bench_speculative(args) -> None:
    limits = machine_limits()
    target, tok = load_checkpoint(args.target)
    drafts = {path: load_checkpoint(path)[0] for path in args.draft}
    prompts = [tok.encode(p) for p in held_out_prompts(args.prompts, 64)]
    variants = {"target alone": lambda: None}
    for path, draft in drafts.items():
        for k in args.draft_tokens:
            variants[f"`{path}`, k={k}"] = (lambda draft=draft, k=k: Speculation(draft=draft, tokens=k))
    seconds, results, accept = timed_generation(target, prompts, args.new_tokens, variants, args.rounds)
    total = args.new_tokens * len(prompts)
    base = seconds["target alone"]
    rows = [[name, f"{total / s:.1f}", f"**{base / s:.2f}x**", "-" if name == "target alone" else f"{accept[name]:.0%}",
             agreement(target, prompts, results["target alone"], results[name])] for name, s in seconds.items()]
    alone = best_times({path: (lambda d=d: [list(generate_tokens(d, [p], max_new_tokens=args.new_tokens,
                                                                  sampling=Sampling(0))) for p in prompts])
                        for path, d in drafts.items()}, args.rounds)
    for row in rows:
        print(row, flush=True)

    def size(path, model):
        return (f"`{path}` ({model.cfg.n_layer} layers x {model.cfg.d_model}, {model.num_params():,} parameters"
                + (f"; alone {total / alone[path]:.0f} tok/s)" if path in alone else ")"))

    body = (
        f"{limits_line(limits)}\n\n"
        f"Greedy decoding, {args.new_tokens} new tokens after each of {len(prompts)} held-out 64-character "
        f"Shakespeare prompts (the val split), batch 1, fp32, eager. Target: {size(args.target, target)}; drafts "
        "(trained on the same text with the same character tokenizer): "
        + ", ".join(size(path, d) for path, d in drafts.items())
        + f". Acceptance = draft tokens kept / proposed. Best of {args.rounds} interleaved rounds.\n\n"
        + table(["decoding", "tokens/s", "speed-up over the target alone", "acceptance",
                 "prompts with the same tokens as the target alone"], rows)
    )
    name = args.target.rstrip("/").split("/")[-1]
    write_section(f"decoding-speculative-{name}{tagged(args)}", f"Speculative decoding on CPU, target `{args.target}` "
                  f"({args.threads} threads{tagged(args, ', ')})", body,
                  f"python -m benchmarks.bench_decoding speculative --target {args.target} --draft "
                  + " ".join(args.draft) + " --draft-tokens " + " ".join(map(str, args.draft_tokens))
                  + tagged(args, " --tag "))


def bench_lookup(args) -> None:
    limits = machine_limits()
    target, tok = load_checkpoint(args.target)
    passages = held_out_prompts(args.prompts, 100)
    # the model is shown a passage, then its first words again: continuing means copying the passage
    prompts = [tok.encode(p + "\n\n" + p[:20]) for p in passages]
    variants = {"target alone": lambda: None}
    for n in (2, 3):
        variants[f"prompt lookup n={n}, k={args.lookup_tokens}"] = (
            lambda n=n: Speculation(prompt_lookup=n, tokens=args.lookup_tokens))
    seconds, results, accept = timed_generation(target, prompts, args.new_tokens, variants, args.rounds)
    total = args.new_tokens * len(prompts)
    base = seconds["target alone"]
    copied = sum(tok.decode(r).startswith(p[20:40]) for r, p in zip(results["target alone"], passages))
    rows = [[name, f"{total / s:.1f}", f"**{base / s:.2f}x**", "-" if name == "target alone" else f"{accept[name]:.0%}",
             agreement(target, prompts, results["target alone"], results[name])] for name, s in seconds.items()]
    for row in rows:
        print(row, flush=True)
    body = (
        f"{limits_line(limits)}\n\n"
        f"Greedy decoding of `{args.target}`, {args.new_tokens} new tokens, batch 1, fp32, eager. Each prompt is a "
        "100-character held-out passage, a blank line, and the passage's first 20 characters again, so that "
        f"continuing it means copying (the model alone copied the next 20 characters in {copied} of "
        f"{len(passages)}). Best of {args.rounds} interleaved rounds.\n\n"
        + table(["decoding", "tokens/s", "speed-up over the target alone", "acceptance",
                 "prompts with the same tokens as the target alone"], rows)
    )
    write_section(f"decoding-lookup{tagged(args)}",
                  f"Prompt-lookup decoding on an input-copying task ({args.threads} threads{tagged(args, ', ')})",
                  body, f"python -m benchmarks.bench_decoding lookup --target {args.target}{tagged(args, ' --tag ')}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["beams", "linears", "speculative", "lookup"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--target", default="runs/target-char")
    parser.add_argument("--draft", nargs="+", default=["runs/draft-char"])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--lookup-tokens", type=int, default=8)
    parser.add_argument("--tag", default="", help="suffix for the results.md sections (another machine's run)")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.new_tokens is None:
        args.new_tokens = 32 if args.what == "beams" else 200
    {"beams": bench_beams, "linears": bench_linears, "speculative": bench_speculative,
     "lookup": bench_lookup}[args.what](args)


if __name__ == "__main__":
    main()
