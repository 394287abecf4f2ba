"""The tile table of the implicit-GEMM convolution / inner-product kernel
(templates/cuda/gemm_conv.cu.j2) and the rule that picks a tile per layer shape.

A GEMM of M output channels (per group) x NPIX output pixels (images x OH x OW) is cut
into BM x BN block tiles, K in steps of BK through shared memory.  With tensor cores each
warp owns a WM x WN part of the block tile (16 x 16 wmma fragments); the strict-fp32 kernel
has 256 threads on a 16 x 16 grid, each computing (BM/16) x (BN/16) outputs.

The rule: among the tiles of the table, the best product of the fraction of its blocks'
work that is not wasted on the ragged edges of M and NPIX, a discount when it would
leave the GPU's SMs idle (fewer than two blocks per SM), and the tile's reuse (flops per
element loaded grow as sqrt(BM*BN/(BM+BN))); near-ties go to the larger tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: SMs of the default target (H100 SXM: 132); the rule only needs the order of magnitude
SMS = 132


@dataclass(frozen=True)
class Tile:
    BM: int
    BN: int
    BK: int = 16
    WM: int = 0          # warp tile (tensor cores); 0: the SIMT kernel
    WN: int = 0

    @property
    def wmma(self) -> bool:
        return self.WM > 0

    @property
    def threads(self) -> int:
        if self.wmma:
            return 32 * (self.BM // self.WM) * (self.BN // self.WN)
        return 256

    @property
    def name(self) -> str:
        return f"{self.BM}x{self.BN}x{self.BK}" + (f"w{self.WM}x{self.WN}" if self.wmma else "")


#: tensor-core tiles (BM, BN, BK, WM, WN)
WMMA_TILES = (
    Tile(128, 128, 16, 64, 32),   # 8 warps, 4x2 fragments each: big layers
    Tile(128, 64, 16, 32, 32),    # 8 warps
    Tile(64, 128, 16, 32, 32),    # 8 warps: few channels, many pixels
    Tile(64, 64, 16, 32, 32),     # 4 warps
    Tile(32, 64, 16, 16, 32),     # 4 warps: few output channels
    Tile(64, 32, 16, 16, 32),     # 4 warps: few pixels (late layers, small batch)
    Tile(128, 16, 16, 16, 16),    # 8 warps: inner products of a small batch
    Tile(64, 16, 16, 16, 16),     # 4 warps
)

#: strict fp32 (SIMT FMA) tiles, 256 threads
SIMT_TILES = (
    Tile(128, 64), Tile(64, 64), Tile(64, 32), Tile(32, 64), Tile(64, 16), Tile(32, 32),
)


def choose_tile(M: int, npix: int, groups: int = 1, *, tensor_cores: bool = True,
                sms: int = SMS) -> Tile:
    """The tile for a GEMM of M (per group) x npix, ``groups`` times."""
    table = WMMA_TILES if tensor_cores else SIMT_TILES

    def rank(t: Tile):
        bm, bn = math.ceil(M / t.BM), math.ceil(npix / t.BN)
        used = (M * npix) / (bm * t.BM * bn * t.BN)
        occupancy = min(1.0, bm * bn * groups / (2 * sms))
        reuse = math.sqrt(t.BM * t.BN / (t.BM + t.BN))   # flops per element loaded
        score = used * (0.25 + 0.75 * occupancy) * reuse
        return round(score * 50), t.BM * t.BN      # near-equal scores: the larger tile
    return max(table, key=rank)
