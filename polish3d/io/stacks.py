"""Tilt images as one ``(F, H, W)`` array-like over the sections of one or several MRC files.

Non-finite pixels (NaN, ±inf: a dead detector patch, a failed motion correction) are masked on
opening: each affected tilt is read once, its non-finite pixels are replaced by the mean of its
finite pixels (0 when it has none), and the count is kept in :attr:`StackView.non_finite`. A box
that is entirely masked is then constant, so after the mean removal of the extraction window it
carries no signal and adds nothing to the cross-correlation; :meth:`StackView.usable` tells
which particle–tilt boxes are mostly masked, so that the refinement leaves them out. (No JAX
here.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["StackView"]

#: block size (pixels) of the masked-pixel counts behind :meth:`StackView.usable`
_BLOCK = 8


class StackView:
    """``(F, H, W)`` float32 view over tilt images stored as sections of MRC files.

    Args:
        image_files: ``[(path, section), ...]`` in tilt order.
        mask_non_finite: scan every tilt for non-finite pixels and replace them (see module).

    Attributes:
        shape: ``(F, H, W)``.
        non_finite: ``{tilt index: number of non-finite pixels replaced}`` (empty when clean).
    """

    def __init__(self, image_files: list[tuple[str, int]], *, mask_non_finite: bool = True):
        from polish3d.io import mrc

        self._files = {}
        for path, _ in image_files:
            if path not in self._files:
                self._files[path] = mrc.open_stack(path)
        self._items = [(self._files[p], i) for p, i in image_files]
        first = self._items[0][0]
        self.shape = (len(self._items), first.shape[1], first.shape[2])
        self.non_finite: dict[int, int] = {}
        self._clean: dict[int, np.ndarray] = {}
        self._masked: dict[int, np.ndarray] = {}  # per masked tilt: summed-area table of blocks
        if mask_non_finite:
            self._mask_non_finite()
        single = len(self._files) == 1 and not self._clean
        self._single = first if single else None
        self._index = np.array([i for _, i in image_files]) if single else None

    def _mask_non_finite(self) -> None:
        for j, (arr, i) in enumerate(self._items):
            if not np.issubdtype(arr.dtype, np.floating):
                continue
            img = arr[i]
            # one pass per tilt, no allocation: the sum is finite unless a pixel is not (or the
            # sum overflows, which the exact test below then clears)
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.sum(img)):
                    continue
            ok = np.isfinite(img)
            bad = int(ok.size - np.count_nonzero(ok))
            if bad == 0:
                continue
            clean = np.array(img, np.float32)
            clean[~ok] = float(np.mean(clean[ok], dtype=np.float64)) if bad < ok.size else 0.0
            self._clean[j] = clean
            self.non_finite[j] = bad
            self._masked[j] = self._block_table(~ok)

    @staticmethod
    def _block_table(mask: np.ndarray) -> np.ndarray:
        """Summed-area table ``(H/b + 1, W/b + 1)`` of masked-pixel counts in ``b × b`` blocks."""
        b = _BLOCK
        h, w = mask.shape
        padded = np.zeros((-(-h // b) * b, -(-w // b) * b), np.int32)
        padded[:h, :w] = mask
        counts = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).sum(axis=(1, 3))
        table = np.zeros((counts.shape[0] + 1, counts.shape[1] + 1), np.int64)
        table[1:, 1:] = counts.cumsum(0).cumsum(1)
        return table

    def usable(self, positions_px, box: int, max_masked: float = 0.5) -> np.ndarray:
        """Which particle–tilt boxes are *not* mostly masked.

        Args:
            positions_px: ``(..., F, 2)`` box centres ``(x, y)`` in every tilt.
            box: box size (pixels).
            max_masked: largest masked fraction of a box that is still used.

        Returns:
            ``(..., F)`` bool: false where more than ``max_masked`` of the box is masked
            (counted on :data:`_BLOCK`-pixel blocks; always true on clean tilts).
        """
        u = np.asarray(positions_px, np.float64)
        ok = np.ones(u.shape[:-1], bool)
        b = _BLOCK
        for j, table in self._masked.items():
            corner = np.floor(u[..., j, :] + 0.5) - box // 2
            x0 = np.clip(corner[..., 0] // b, 0, table.shape[1] - 1).astype(np.int64)
            y0 = np.clip(corner[..., 1] // b, 0, table.shape[0] - 1).astype(np.int64)
            x1 = np.clip(-(-(corner[..., 0] + box) // b), 0, table.shape[1] - 1).astype(np.int64)
            y1 = np.clip(-(-(corner[..., 1] + box) // b), 0, table.shape[0] - 1).astype(np.int64)
            masked = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
            ok[..., j] = masked <= max_masked * box * box
        return ok

    def _image(self, j: int):
        if j in self._clean:
            return self._clean[j]
        arr, i = self._items[j]
        return arr[i]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            j = int(key)
            if j < 0:
                j += self.shape[0]
            if not 0 <= j < self.shape[0]:
                raise IndexError(f"tilt {key} out of range for {self.shape[0]} tilts")
            return self._image(j)
        if self._single is not None and isinstance(key, tuple):
            fi = np.asarray(key[0])
            return self._single[(self._index[fi],) + tuple(key[1:])]
        fi = np.broadcast_to(np.asarray(key[0]), np.broadcast_shapes(*[np.shape(k) for k in key]))
        out = np.empty(fi.shape, np.float32)
        iy = np.broadcast_to(key[1], fi.shape)
        ix = np.broadcast_to(key[2], fi.shape)
        for j in np.unique(fi):
            m = fi == j
            out[m] = self._image(int(j))[iy[m], ix[m]]
        return out
