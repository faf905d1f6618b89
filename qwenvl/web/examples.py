"""Example prompts for the web demo, one per capability, over images committed under examples/.

The images are small synthetic scenes (qwenvl.synthetic); `python -m qwenvl.web.examples`
draws them again. examples/shapes.png is the CLI's example image and is not redrawn here.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

# (label, image file, prompt, the bundled model can do it). The bundled demonstration model was trained on
# counting, colour and grounding only (README "The bundled model", docs/bundled-model.md), in its own
# phrasing: offering it reading or a chart would show a first-time user a wrong answer; any real checkpoint
# gets them all.
EXAMPLES = [
    ("Count", "shapes.png", "How many triangles are there?", True),
    ("Colour", "shapes.png", "What color is the circle?", True),
    ("Locate", "shapes.png", "Locate the red triangle.", True),
    ("Chinese", "shapes.png", "图中有几个圆形？", True),
    ("Describe", "shapes.png", "Describe this image.", False),
    ("Read text", "word.png", "What is written in the image?", False),
    ("Chart", "chart.png", "What is the value of lineup?", False),
]

# What `draw()` makes: file -> (task, seed, index). Words come from the machine's word list: the chart
# prompt above names a bar of the committed chart.png.
DRAWN = {"word.png": ("read", 7, 1), "chart.png": ("chart", 7, 0)}


def examples(directory: Path = EXAMPLES_DIR, bundled_model: bool = False) -> list[tuple[str, str, str]]:
    """(label, image path, prompt) for the examples whose image exists (none in a wheel install); for the
    bundled model only those it was trained to answer."""
    out = []
    for label, name, prompt, bundled_can in EXAMPLES:
        path = directory / name
        if path.is_file() and (bundled_can or not bundled_model):
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
