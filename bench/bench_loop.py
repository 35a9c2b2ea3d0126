"""Seconds per question of the multi-hop loop, llama.cpp vs torch, on the same model and the same token sequences.

    python bench/bench_loop.py [--model smollm2-135m-instruct] [--questions 10] [--threads 0]

Each question is a scripted 3-turn trajectory (image_search -> text_search -> answer). The policy turns are
teacher-forced: every turn asks the backend to continue `prompt + transcript so far` (greedy, the loop's stop tags,
max_tokens = the scripted turn's length), then appends the *scripted* turn and a fixed <information> block, not
what the model wrote. Both backends therefore see exactly the same prompts in the same order, and their KV caches
face the same reuse opportunities (turns 2 and 3 only run the new tokens; a new question reuses the system prompt).
The torch backend runs the same GGUF, dequantised to float32 (converted once and cached; conversion timed apart).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmhops_lite import grammar
from mmhops_lite.paths import free_cores

# (entity, perception, question, relation, bridge entity, answer)
CASES = [
    ("Eiffel Tower", "looks like: steel arch bridge (0.41), tower (0.33), pier (0.09); text in image: PARIS 1889",
     "The designer of this tower was born in which city?", "designer", "Gustave Eiffel", "Dijon"),
    ("Golden Gate Bridge",
     "looks like: suspension bridge (0.72), pier (0.11), fog (0.04); text in image: SAN FRANCISCO",
     "In which year did the chief engineer of this bridge die?", "chief engineer", "Joseph Strauss", "1938"),
    ("Sydney Opera House", "looks like: dome (0.38), boathouse (0.21), liner (0.12); text in image: SYDNEY",
     "Which country was the architect of this building from?", "architect", "Jørn Utzon", "Denmark"),
    ("Colosseum", "looks like: amphitheatre (0.66), palace (0.10), monastery (0.07); text in image: none",
     "Which emperor began the construction of this building?", "commissioned by", "Vespasian", "Vespasian"),
    ("Big Ben", "looks like: clock tower (0.58), bell cote (0.17), palace (0.09); text in image: WESTMINSTER",
     "Who designed the tower in this picture?", "architect", "Augustus Pugin", "Augustus Pugin"),
    ("Statue of Liberty", "looks like: statue (0.61), pedestal (0.14), torch (0.08); text in image: JULY IV MDCCLXXVI",
     "The sculptor of this statue was born in which town?", "sculptor", "Frédéric Auguste Bartholdi", "Colmar"),
    ("Taj Mahal", "looks like: mosque (0.52), palace (0.19), stupa (0.08); text in image: AGRA",
     "For whom was this mausoleum built?", "commissioned by", "Shah Jahan", "Mumtaz Mahal"),
    ("Burj Khalifa", "looks like: skyscraper (0.70), obelisk (0.09), tower (0.06); text in image: DUBAI 828M",
     "How tall is the building in this image, in metres?", "height", "Skidmore, Owings & Merrill", "828"),
    ("Sagrada Família", "looks like: church (0.49), altar (0.18), castle (0.10); text in image: BARCELONA",
     "In which year did the architect of this church die?", "architect", "Antoni Gaudí", "1926"),
    ("Tower Bridge", "looks like: suspension bridge (0.45), castle (0.22), pier (0.13); text in image: LONDON",
     "Which river does this bridge cross?", "crosses", "River Thames", "Thames"),
]

WORDS = ("built century city river architect designed opened tourists museum iron stone restoration famous "
         "height metres visitors construction engineer completed style public landmark national history "
         "monument government council competition design original structure world heritage site").split()


def passage(rng: random.Random, title: str, fact: str, words: int) -> str:
    """A passage of ~`words` words that states `fact` among plausible filler."""
    body = [rng.choice(WORDS) for _ in range(words)]
    body.insert(rng.randint(0, len(body)), fact)
    return f"{title} is a well-known subject. " + " ".join(body) + "."


def trajectory(i: int, case: tuple) -> tuple[list[dict], list[tuple[str, str]]]:
    """Opening messages and the three scripted (turn text, information block after it) pairs."""
    entity, seen, question, relation, bridge, ans = case
    rng = random.Random(i)
    label = seen.split(": ", 1)[1].split(" (")[0]
    info1 = grammar.information([f"[{k}] {grammar.escape(t)} (image match {s:.2f}): "
                                 f"{grammar.escape(passage(rng, t, f'{entity} {relation} {bridge}.', 55))}"
                                 for k, (t, s) in enumerate([(entity, 0.91), (f"{entity} area", 0.62),
                                                             ("Similar landmark", 0.48)], 1)])
    info2 = grammar.information([f"[{k}] {grammar.escape(t)}: {grammar.escape(passage(rng, t, f'answer {ans}.', 45))}"
                                 for k, t in enumerate([bridge, f"{bridge} biography", entity], 1)])
    turns = [
        (f"<think>The image shows a {label}; first I identify it.</think><image_search>1</image_search>", info1),
        ((f"<think>It is the {entity}. Now I need its {relation}.</think>"
          f"<text_search>{entity} {relation} {bridge}</text_search>"), info2),
        (f"<think>The passages say {ans}.</think><answer>{ans}</answer>", ""),
    ]
    return grammar.messages(f"<image> {question}", [seen]), turns


def run_question(gen, i: int, case: tuple) -> dict:
    """One teacher-forced question; per-turn prompt/evaluated/generated tokens and seconds."""
    msgs, turns = trajectory(i, case)
    t0 = time.perf_counter()
    prompt, transcript, rows = gen.render(msgs), "", []
    for text, info in turns:
        g = gen.generate(prompt + transcript, grammar.STOP, max_tokens=gen.count_tokens(text), temperature=0.0)
        rows.append((g.prompt_tokens, g.evaluated_tokens, g.completion_tokens, g.seconds))
        transcript += text + info
    return {"seconds": time.perf_counter() - t0, "turns": rows}


def rates(gen, n: int = 48, repeats: int = 3) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) on a fixed prompt with the cache state controlled; median of `repeats`."""
    filler = " ".join(WORDS * 12)
    p = f"Count on: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20. {filler}\n1, 2, 3,"
    pre, dec = [], []
    for _ in range(repeats):
        gen.generate("Unrelated reset prompt.", (), max_tokens=1)  # the next prompt shares no prefix: full prefill
        a = gen.generate(p, (), max_tokens=1)
        b = gen.generate(p, (), max_tokens=1)  # cached: one token re-run, one generated
        c = gen.generate(p, (), max_tokens=n)  # cached: one token re-run, up to n generated
        dec.append((c.completion_tokens - b.completion_tokens) / max(c.seconds - b.seconds, 1e-9))
        pre.append(a.evaluated_tokens / max(a.seconds - b.seconds, 1e-9))
    return statistics.median(pre), statistics.median(dec)


def summarise(name: str, gen, load: float, runs: list[dict], rate: tuple[float, float]) -> dict:
    """The per-backend row of the table."""
    warm = runs[1:] or runs
    med = [[statistics.median(r["turns"][k][j] for r in warm) for j in range(3)] for k in range(3)]
    return {"backend": name, "id": gen.id, "load": load, "cold": load + runs[0]["seconds"],
            "first": runs[0]["seconds"], "warm_p50": statistics.median(r["seconds"] for r in warm),
            "cold_turns": [t[:3] for t in runs[0]["turns"]], "warm_turns": med, "prefill": rate[0],
            "decode": rate[1], "generated": sum(t[2] for r in runs for t in r["turns"]) / len(runs)}


def makers(path: Path, n_ctx: int, threads: int, names: list[str]) -> dict:
    """name -> zero-argument constructor of that backend's generator."""
    out = {}
    for name in names:
        if name == "llamacpp":
            from mmhops_lite.backends.llamacpp import LlamaCppGenerator

            out[name] = lambda: LlamaCppGenerator(path, n_ctx=n_ctx, threads=threads)
        elif name == "torch":
            from mmhops_lite.backends.torch_backend import TorchGenerator
            from mmhops_lite.convert import hf_from_gguf

            if path.suffix == ".gguf":
                t = time.perf_counter()
                hf_from_gguf(path)  # one-time: later loads read the cached float32 checkpoint
                print(f"torch: GGUF -> HF conversion (or cache hit) {time.perf_counter() - t:.1f}s, not counted below")
            out[name] = lambda: TorchGenerator(path, n_ctx=n_ctx, threads=threads)
        else:
            raise SystemExit(f"unknown backend {name}")
    return out


def main(argv=None) -> int:
    """Run the backends interleaved question by question and print a side-by-side table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf path")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="0 = the cores not busy with other processes")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--backends", default="llamacpp,torch")
    args = ap.parse_args(argv)

    from mmhops_lite.registry import resolve

    path = resolve(args.model, "policy")
    threads = args.threads or free_cores()
    names = args.backends.split(",")
    print(f"model: {path.name}   threads: {threads}   questions: {args.questions} x 3 turns (teacher-forced)")
    make = makers(path, args.n_ctx, threads, names)
    # Interleaved (load, then question by question) so that on a shared machine both backends meet the same load.
    gens, loads, runs = {}, {}, {n: [] for n in names}
    for name in names:
        t = time.perf_counter()
        gens[name] = make[name]()
        loads[name] = time.perf_counter() - t
        runs[name].append(run_question(gens[name], 0, CASES[0]))
    for i in range(1, args.questions):
        for name in names:
            runs[name].append(run_question(gens[name], i, CASES[i % len(CASES)]))
    results = [summarise(n, gens[n], loads[n], runs[n], rates(gens[n])) for n in names]

    print()
    cols = [r["backend"] for r in results]
    rows = [("model load s", "load", "{:.2f}"), ("cold s (load + Q1)", "cold", "{:.2f}"),
            ("Q1 alone s", "first", "{:.2f}"), ("warm p50 s/question", "warm_p50", "{:.3f}"),
            ("prefill tok/s", "prefill", "{:.0f}"), ("decode tok/s", "decode", "{:.1f}"),
            ("generated tok/question", "generated", "{:.1f}")]
    print(f"{'':<34}" + "".join(f"{c:>14}" for c in cols))
    for label, key, fmt in rows:
        print(f"{label:<34}" + "".join(f"{fmt.format(r[key]):>14}" for r in results))
    for k in range(3):
        print(f"{f'turn {k + 1} prompt/eval/gen tok (Q1)':<34}"
              + "".join(f"{'/'.join(str(int(x)) for x in r['cold_turns'][k]):>14}" for r in results))
    for k in range(3):
        print(f"{f'turn {k + 1} prompt/eval/gen tok (warm p50)':<34}"
              + "".join(f"{'/'.join(str(int(x)) for x in r['warm_turns'][k]):>14}" for r in results))
    if len(results) == 2:
        a, b = results
        print(f"\n{a['backend']} vs {b['backend']} speed ratio: warm {b['warm_p50'] / a['warm_p50']:.1f}x, "
              f"cold {b['cold'] / a['cold']:.1f}x, decode {a['decode'] / b['decode']:.1f}x, "
              f"prefill {a['prefill'] / b['prefill']:.1f}x  (target >= 5x warm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
