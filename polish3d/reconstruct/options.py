"""Options and result of a half-map reconstruction (``polish3d reconstruct``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from polish3d.errors import InputError

__all__ = ["ReconstructOptions", "Reconstruction"]

#: particle–tilt pairs per compiled call when ``chunk`` is 0 (about 100 MB of temporaries at
#: box 64; scaled by ``(64/s)²`` for other boxes)
_AUTO_PAIRS_AT_64 = 64


@dataclass(frozen=True)
class ReconstructOptions:
    """Options of a reconstruction (names follow ``relion_tomo_reconstruct_particle``).

    Attributes:
        box: ``--b``, box size in output pixels (even); the map is ``box³``.
        crop: ``--crop``, output size after reconstruction (px, even, ``< box``); ``≤ 0``: none.
        binning: ``--bin``, output pixel size / tilt-series pixel size (≥ 1): windows of
            ``round(binning · box)`` tilt-series pixels are Fourier-cropped to ``box``.
        snr: ``--SNR``; ``> 0``: Wiener offset ``1/SNR``, else RELION's heuristic
            (``max(W, 0.001 · shell mean)``).
        max_dose: ``--max_dose``, use only tilts with pre-exposure ≤ this (e⁻/Å²); ``≤ 0``: all.
        cutoff_fract: ``--cutoff_fract``, ignore frequencies whose dose weight is below this.
        taper_px: ``--taper``, width of the final spherical taper (px).
        chunk: particle–tilt pairs per compiled call; 0: automatic.
    """

    box: int
    crop: int = -1
    binning: float = 1.0
    snr: float = -1.0
    max_dose: float = -1.0
    cutoff_fract: float = 0.01
    taper_px: float = 10.0
    chunk: int = 0

    def __post_init__(self):
        if self.box <= 0 or self.box % 2:
            raise InputError(f"--b {self.box}: the box must be a positive even number of pixels")
        if self.crop > 0 and (self.crop % 2 or self.crop >= self.box):
            raise InputError(f"--crop {self.crop}: must be even and smaller than --b {self.box}")
        if not self.binning >= 1.0:
            raise InputError(f"--bin {self.binning:g}: must be at least 1")
        if self.chunk < 0:
            raise InputError(f"--chunk {self.chunk}: must be 0 (automatic) or positive")
        if not 0.0 <= self.cutoff_fract < 1.0:
            raise InputError(f"--cutoff_fract {self.cutoff_fract:g}: must lie in [0, 1)")

    @property
    def window_px(self) -> int:
        """Extraction window in tilt-series pixels (RELION's ``s02D = (int)(bin · s + 0.5)``)."""
        return int(self.binning * self.box + 0.5)

    @property
    def out_box(self) -> int:
        """Size of the written maps (px)."""
        return self.crop if self.crop > 0 else self.box

    def pairs_per_call(self) -> int:
        """Pairs per compiled insertion call."""
        if self.chunk > 0:
            return self.chunk
        return max(8, int(_AUTO_PAIRS_AT_64 * (64.0 / self.box) ** 2))


@dataclass
class Reconstruction:
    """Two half maps, their merge and FSC.

    Attributes:
        half1, half2, merged: ``(n, n, n)`` maps ``[z, y, x]`` float32, ``n = out_box``
            (half maps of an empty half set are zeros).
        pixel_size_ang: voxel size of the maps (Å).
        fsc: ``(n//2 + 1,)`` FSC of the half maps per shell (``nan`` when a half is empty).
        resolution_ang: resolution at FSC 0.143 (Å; ``nan`` without two halves).
        n_pairs: particle–tilt pairs inserted into half 1 and half 2.
        n_particles: particles of half 1 and half 2 with at least one pair.
        seconds: wall time.
        full: the uncropped half maps / merged map when ``crop`` was used (else empty).
    """

    half1: np.ndarray
    half2: np.ndarray
    merged: np.ndarray
    pixel_size_ang: float
    fsc: np.ndarray
    resolution_ang: float
    n_pairs: tuple[int, int]
    n_particles: tuple[int, int]
    seconds: float = 0.0
    full: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shells(self) -> np.ndarray:
        """Shell indices ``0 … n//2``."""
        return np.arange(len(self.fsc))

    @property
    def shell_resolution_ang(self) -> np.ndarray:
        """Resolution of each shell, ``n · px / k`` (Å; ``inf`` at ``k = 0``)."""
        k = self.shells.astype(np.float64)
        with np.errstate(divide="ignore"):
            return len(self.half1) * self.pixel_size_ang / k
