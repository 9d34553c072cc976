"""A crack-map checkpoint at work: P(crack) per pixel of a whole photo, the scan's tiles
derived from that map by the tile rule (so a tile table reads like a classifier's), and
the figure that draws the crack line thin over the photo."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from crack_lightning.models.crack_map import CrackMapNet, tile_scores

# a photo with more pixels than this is mapped in overlapping pieces of PIECE px (the
# activations of one 12 Mpx pass take several GB)
ONE_PASS_PIXELS = 1536 * 1536
PIECE = 1024
# what each piece adds around itself, so that its kept part has the context it has inside
# the photo (the encoder's receptive field reaches about this far where it matters)
MARGIN = 64
# the crack line's colour on the figure
LINE_COLOUR = (255, 30, 30)


@dataclass
class MapNetwork:
    """A crack-map checkpoint's network on a device. Crops (predict, the page's patches)
    get a P(crack) from their map by the tile rule at min_share, as training scored them."""

    net: CrackMapNet
    device: torch.device
    min_share: float

    def __post_init__(self) -> None:
        self.net = self.net.to(self.device).eval()

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """P(crack) of each crop: the tile rule on its map, as training scores crops."""
        probs = torch.sigmoid(self.net(images.to(self.device)))
        return tile_scores(probs, self.min_share).float().cpu().numpy()

    @torch.inference_mode()
    def crack_map(self, pixels: torch.Tensor) -> np.ndarray:
        """(H, W) float32 P(crack) of a uint8 (3, H, W) photo, at its own scale."""
        height, width = pixels.shape[-2:]
        if height * width <= ONE_PASS_PIXELS:
            return self._map(pixels)
        out = np.empty((height, width), dtype=np.float32)
        for top in range(0, height, PIECE):
            for left in range(0, width, PIECE):
                y0, x0 = max(0, top - MARGIN), max(0, left - MARGIN)
                y1 = min(height, top + PIECE + MARGIN)
                x1 = min(width, left + PIECE + MARGIN)
                piece = self._map(pixels[:, y0:y1, x0:x1])
                keep_h, keep_w = min(PIECE, height - top), min(PIECE, width - left)
                out[top : top + keep_h, left : left + keep_w] = piece[
                    top - y0 : top - y0 + keep_h, left - x0 : left - x0 + keep_w
                ]
        return out

    def _map(self, pixels: torch.Tensor) -> np.ndarray:
        logits = self.net(pixels.unsqueeze(0).to(self.device))
        return torch.sigmoid(logits)[0, 0].float().cpu().numpy()


def map_png(crack_map: np.ndarray) -> Image.Image:
    """The map as an 8-bit grey image: P(crack) x 255, the photo's size."""
    return Image.fromarray(np.round(crack_map * 255).astype(np.uint8), mode="L")


def render_map(
    crack_map: np.ndarray, threshold: float, photo: Image.Image, scale: float
) -> Image.Image:
    """The photo, scaled by `scale`, with the crack line (the skeleton of the pixels at or
    above threshold) drawn one pixel wide: the surface around it stays as photographed."""
    from skimage.morphology import skeletonize

    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    crack = Image.fromarray(crack_map >= threshold).resize(size, Image.Resampling.NEAREST)
    line = skeletonize(np.array(crack), method="lee").astype(bool)
    pixels = np.asarray(photo.convert("RGB").resize(size)).copy()
    pixels[line] = LINE_COLOUR
    return Image.fromarray(pixels)
