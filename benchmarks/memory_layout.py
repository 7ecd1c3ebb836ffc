"""The memory-layout picture of docs/index.md, drawn from a real run: what every layer of SmolLM2-135M
attends while it answers a question about a fact planted in ~8k tokens of Pride and Prejudice.

One row per layer, one column per token of the session: the initial tokens, the events that layer
retrieved for the question, the local window, and the events it left in the CPU tier. The planted fact
is marked. Writes docs/img/memory_layout.png (or --out).

    python benchmarks/memory_layout.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "img" / "memory_layout.png"
STORED, INIT, RETRIEVED, WINDOW = range(4)
COLOURS = ("#eeeeee", "#555555", "#d95f02", "#1b9e77")
LABELS = ("stored event (CPU tier)", "initial tokens", "retrieved for this answer", "local window")


def layout(session) -> torch.Tensor:
    """(layers, tokens) category of every token for every layer, from each layer's last selection."""
    timeline = session.timeline
    grid = torch.full((len(session.layers), timeline.num_tokens), STORED, dtype=torch.uint8)
    grid[:, : timeline.init_len] = INIT
    grid[:, timeline.window_start :] = WINDOW
    for row, layer in zip(grid, session.layers, strict=True):
        for event in layer._selection or ():
            start, stop = timeline.events[event]
            row[start:stop] = RETRIEVED
    return grid


def draw(grid: torch.Tensor, fact_tokens: tuple[int, int], answer: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.imshow(
        grid.numpy(), aspect="auto", interpolation="nearest", cmap=ListedColormap(COLOURS), vmin=0, vmax=3
    )
    for x in fact_tokens:
        ax.axvline(x, color="#7570b3", linewidth=0.8)
    ax.set_xlabel("token of the session (book, then the question)")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"What each layer attends while answering  (answer: {answer.strip()[:40]!r})", fontsize=9)
    handles = [Patch(color=c, label=label) for c, label in zip(COLOURS, LABELS, strict=True)]
    handles.append(Line2D([], [], color="#7570b3", linewidth=0.8, label="the planted fact"))
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5, fontsize=8, frameon=False
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import emllm
    from emllm.tasks import demo_text, fill_to_tokens, planted_fact_probe

    engine = emllm.EMLLM.from_pretrained()
    probe = planted_fact_probe(engine.tokenizer, fill_to_tokens(engine.tokenizer, demo_text(), args.tokens))
    session = engine.session()
    session.feed(probe.context)
    answer = session.generate(probe.question, max_new_tokens=8)
    fact_at = session.text.index("The secret code of the Longbourn library")
    fact_tokens = _token_span(
        session, fact_at, fact_at + len("The secret code of the Longbourn library is 73914.")
    )
    grid = layout(session)
    draw(grid, fact_tokens, answer, args.out)
    attending = int((grid[:, fact_tokens[0] : fact_tokens[1] + 1] == RETRIEVED).any(dim=1).sum())
    print(f"wrote {args.out}; answer {answer!r}; {attending}/{grid.shape[0]} layers attend the planted fact")


def _token_span(session, char_start: int, char_end: int) -> tuple[int, int]:
    """First and last token whose text overlaps [char_start, char_end)."""
    ends = session._char_end
    first = next(i for i, end in enumerate(ends) if end > char_start)
    last = next(i for i, end in enumerate(ends) if end >= char_end)
    return first, last


if __name__ == "__main__":
    main()
