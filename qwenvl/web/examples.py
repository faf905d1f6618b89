"""Example prompts for the web demo, one per capability, over images committed under examples/.

The images are small synthetic scenes (qwenvl.synthetic); `python -m qwenvl.web.examples`
draws them again. examples/shapes.png is the CLI's example image and is not redrawn here.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

# (label, image file, prompt)
EXAMPLES = [
    ("Describe", "shapes.png", "Describe this image."),
    ("Locate", "shapes.png", "Locate the red triangle."),
    ("Read text", "word.png", "What is written in the image?"),
    ("Chart", "chart.png", "What is the value of lineup?"),
    ("Chinese", "shapes.png", "图中有几个圆形？"),
]

# What `draw()` makes: file -> (task, seed, index). Words come from the machine's word list: the chart
# prompt above names a bar of the committed chart.png.
DRAWN = {"word.png": ("read", 7, 1), "chart.png": ("chart", 7, 0)}


def examples(directory: Path = EXAMPLES_DIR) -> list[tuple[str, str, str]]:
    """(label, image path, prompt) for the examples whose image exists (none in a wheel install)."""
    out = []
    for label, name, prompt in EXAMPLES:
        path = directory / name
        if path.is_file():
            out.append((label, str(path), prompt))
    return out


def draw(directory: Path = EXAMPLES_DIR) -> None:
    from ..synthetic import make_sample

    for name, (task, seed, index) in DRAWN.items():
        sample = make_sample(seed, index, task=task, lang="en")
        sample.image.save(directory / name, optimize=True)
        print(f"{directory / name}: {sample.image.size} {sample.question!r} -> {sample.answer!r}")


if __name__ == "__main__":
    draw()
