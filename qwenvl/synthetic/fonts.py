"""Find the font files the synthetic data is drawn with (DejaVu, Liberation, Noto CJK) and the word list.

The generator only needs Latin glyphs: every text it renders is an English word or a number (Chinese
appears only in questions and answers, never in pixels). A bare machine (a lent GPU box, a container)
has neither fonts nor /usr/share/dict: `export_assets()` copies what is needed into one folder and
`QWENVL_SYNTH_ASSETS=that/folder` makes it the first place searched.

Search order for fonts: $QWENVL_FONT_DIRS (os.pathsep-separated), $QWENVL_SYNTH_ASSETS/fonts, the
system font folders. Word list: $QWENVL_WORDLIST, $QWENVL_SYNTH_ASSETS/words.txt, /usr/share/dict.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from PIL import ImageFont

APT_HINT = ("install the Debian packages fonts-dejavu-core and fonts-liberation (fonts-noto-cjk optional): "
            "`apt-get install fonts-dejavu-core fonts-liberation fonts-noto-cjk`, or point QWENVL_FONT_DIRS "
            "(or QWENVL_SYNTH_ASSETS, see qwenvl.synthetic.fonts.export_assets) at a folder holding those .ttf files")
WORDLIST_HINT = ("install the Debian package wamerican (`apt-get install wamerican`, gives "
                 "/usr/share/dict/american-english), or set QWENVL_WORDLIST to a file of one word per line")

SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
                    "/Library/Fonts", "/System/Library/Fonts")
SYSTEM_WORDLISTS = ("/usr/share/dict/american-english", "/usr/share/dict/words")

# Font families used for rendered text, by file-name prefix. Decorative or symbol faces are left out.
LATIN_PREFIXES = ("DejaVuSans", "DejaVuSerif", "LiberationSans", "LiberationSerif", "LiberationMono")
# Only the regular sans CJK collection (19 MB) is drawn with: its Latin glyphs are a further common
# face, and the copy stays small enough to carry to a bare machine.
CJK_PREFIXES = ("NotoSansCJK-Regular",)
EXCLUDE = ("DejaVuMathTeXGyre",)


class MissingAssetError(RuntimeError):
    """No usable font or word list on this machine; the message says what to install."""


def _asset_root() -> Path | None:
    root = os.environ.get("QWENVL_SYNTH_ASSETS")
    return Path(root).expanduser() if root else None


def font_dirs() -> list[Path]:
    dirs = [Path(d).expanduser() for d in os.environ.get("QWENVL_FONT_DIRS", "").split(os.pathsep) if d]
    root = _asset_root()
    if root is not None:
        dirs.append(root / "fonts")
    dirs += [Path(d).expanduser() for d in SYSTEM_FONT_DIRS]
    return [d for d in dirs if d.is_dir()]


@functools.lru_cache(maxsize=None)
def _scan() -> dict[str, tuple[str, ...]]:
    """{"latin": paths, "cjk": paths}, sorted by file name so that choices are stable on one machine."""
    seen: dict[str, str] = {}   # file name -> first path found (earlier folders win)
    for d in font_dirs():
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in (".ttf", ".otf", ".ttc") and p.name not in seen:
                seen[p.name] = str(p)
    latin = tuple(seen[n] for n in sorted(seen)
                  if n.startswith(LATIN_PREFIXES) and not n.startswith(EXCLUDE))
    cjk = tuple(seen[n] for n in sorted(seen) if n.startswith(CJK_PREFIXES))
    return {"latin": latin, "cjk": cjk}


def latin_fonts() -> tuple[str, ...]:
    """Paths of the DejaVu / Liberation faces found (regular, bold, italic, mono, serif ...)."""
    fonts = _scan()["latin"]
    if not fonts:
        searched = ", ".join(str(d) for d in font_dirs()) or "(no font folder exists)"
        raise MissingAssetError(f"no DejaVu or Liberation font found in {searched}; {APT_HINT}")
    return fonts


def cjk_fonts() -> tuple[str, ...]:
    """Paths of the Noto CJK collections found; may be empty (they are optional)."""
    return _scan()["cjk"]


def text_fonts() -> tuple[str, ...]:
    """Every face the generator draws Latin text with: DejaVu, Liberation and, where present, Noto CJK."""
    return latin_fonts() + cjk_fonts()


@functools.lru_cache(maxsize=4096)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached FreeType font; a worker process loads each (face, size) once."""
    return ImageFont.truetype(path, size=size, index=0)


def font_name(path: str) -> str:
    return Path(path).stem


@functools.lru_cache(maxsize=1)
def wordlist_path() -> Path:
    candidates = [os.environ.get("QWENVL_WORDLIST", "")]
    root = _asset_root()
    if root is not None:
        candidates.append(str(root / "words.txt"))
    candidates += list(SYSTEM_WORDLISTS)
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise MissingAssetError(f"no word list found (looked at {', '.join(c for c in candidates if c)}); {WORDLIST_HINT}")


def export_assets(dst: str | Path, include_cjk: bool = True) -> Path:
    """Copy the fonts drawn with (about 15 MB, 35 MB with Noto Sans CJK) and the word list into `dst`.

    Carry `dst` to a bare machine and set QWENVL_SYNTH_ASSETS=dst there; the samples drawn are then
    the same as here as long as the Pillow/FreeType versions match.
    """
    out = Path(dst)
    (out / "fonts").mkdir(parents=True, exist_ok=True)
    for p in latin_fonts() + (cjk_fonts() if include_cjk else ()):
        shutil.copy2(p, out / "fonts" / Path(p).name)
    shutil.copy2(wordlist_path(), out / "words.txt")
    return out
