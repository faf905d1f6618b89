"""Rotary position embeddings: 3-row M-RoPE for the LM and axial 2D rotary for the ViT.

Nothing here holds a buffer: a model built on the meta device needs no re-materialisation after loading.
The LM's few constant tables (inverse frequencies, which row drives each frequency) are kept per device in a
small module-level cache instead, since every step asks for them (issue 37: ~50 us a decode step).
"""

from __future__ import annotations

import functools

import torch

from .. import kernels


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[dim/2] float32 inverse frequencies of a standard RoPE over `dim` channels."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x[N, ..., Dh], cos/sin[N, Dh] -> x rotated; the product is taken in float32."""
    return rotate(x, *rotary_halves(cos, sin, x.dim() - 2))


def rotary_halves(cos: torch.Tensor, sin: torch.Tensor, head_axes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin[N, Dh] -> their first halves as [N, 1 (x head_axes), Dh/2], the tables `rotate` takes.

    The second halves repeat the first; a decoder takes these once per step, not once per layer."""
    half = cos.shape[-1] // 2
    shape = (cos.shape[0],) + (1,) * head_axes + (half,)
    return cos[:, :half].reshape(shape), sin[:, :half].reshape(shape)


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x[N, ..., Dh] rotated by the half tables c/s[N, 1.., Dh/2] of `rotary_halves`, in float32.

    Equals x * cos + rotate_half(x) * sin exactly, computed on the halves so that no negated copy of x and
    no full-width products are made."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    r1 = (x1 * c).sub_(x2 * s)                # in place where possible: the ViT's q/k are large
    r2 = (x2 * c).add_(x1 * s)
    return torch.cat((r1, r2), dim=-1).to(x.dtype)


def rotate_heads(x: torch.Tensor, heads: int, head_dim: int, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The first `heads` heads of x[N, W] (e.g. q and k of a fused q/k/v output) rotated by the half tables
    c/s[N, 1, Dh/2] of `rotary_halves`, as [N, heads, head_dim]: `rotate`'s numbers, bit for bit.

    On a CPU with qwenvl's kernels this rotates x in place in one call (the result is a view of x), where
    `rotate` costs ~9 ops (the float32 copy, four products, two sums, the cat, the cast back) per layer."""
    n = x.shape[0]
    isa = None
    if x.dim() == 2 and x.device.type == "cpu" and x.stride(-1) == 1 and x.dtype in (torch.float32, torch.bfloat16) \
            and c.dtype == torch.float32 and c.dim() == 3 and c.stride(-1) == 1 and s.stride() == c.stride() \
            and not (torch.is_grad_enabled() and x.requires_grad):
        isa = kernels.decode_ops_isa()
    if isa is not None:
        kernels.rotary_(x, heads, head_dim, c.flatten(1), s.flatten(1), isa)
        return x[:, : heads * head_dim].view(n, heads, head_dim)
    return rotate(x[:, : heads * head_dim].view(n, heads, head_dim), c, s)


def mrope_frequency_axis(mrope_section: tuple[int, ...], interleaved: bool,
                         device: torch.device | None = None) -> torch.Tensor:
    """[Dh/2] long: which position row (0 t, 1 h, 2 w) drives each rotary frequency.

    Qwen2/2.5-VL give t, h, w contiguous chunks of sizes `mrope_section`; Qwen3-VL interleaves them
    (t h w t h w ...), h and w taking slots 1 and 2 of each triple for their first `section` triples,
    t keeping every other slot.
    """
    half = sum(mrope_section)
    if not interleaved:
        return torch.repeat_interleave(
            torch.arange(3, device=device), torch.tensor(mrope_section, device=device))
    axis = torch.zeros(half, dtype=torch.long, device=device)
    for row in (1, 2):
        axis[row: 3 * mrope_section[row]: 3] = row
    return axis


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...], interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """positions[3, N] -> (cos, sin) each [N, Dh] float32, for the LM's multimodal RoPE."""
    inv, axis = _mrope_tables(head_dim, float(theta), tuple(mrope_section), bool(interleaved), positions.device)
    freqs = positions[..., None].float() * inv                                 # [3, N, Dh/2]
    # Pick, for each frequency, the angle from the position row that drives it.
    freqs = freqs.gather(0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]  # [N, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                    # [N, Dh]
    return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=32)
def _mrope_tables(head_dim: int, theta: float, mrope_section: tuple[int, ...], interleaved: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse frequencies [Dh/2], frequency axis [Dh/2]) of the LM's M-RoPE, made once per device. Read only:
    mrope_cos_sin multiplies and gathers with them, never writes them."""
    return (inverse_frequencies(head_dim, theta, device),
            mrope_frequency_axis(mrope_section, interleaved, device))


def vision_patch_coords(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[P, 2] long (row, col) of every patch, in merge-block order, frames repeated.

    Patches arrive grouped by `merge x merge` blocks (row-major over blocks, then within a block),
    which is the order the processor writes pixel_values in and the merger consumes.
    """
    coords = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: block-major order
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        coords.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))          # [t*h*w, 2]
    return torch.cat(coords).to(grid_thw.device)


def vision_cos_sin(coords: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """coords[P, 2] -> (cos, sin) each [P, Dh] float32: half the frequencies follow the row, half the column."""
    inv = inverse_frequencies(head_dim // 2, theta, coords.device)            # [Dh/4]
    freqs = (coords[..., None].float() * inv).flatten(1)                       # [P, 2, Dh/4] -> [P, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                    # [P, Dh]
    return emb.cos(), emb.sin()
