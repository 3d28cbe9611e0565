"""Class lists, label maps and palettes: defined once, here."""
import numpy as np

SCANNET20_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)
# NYU40 ids of the 20 benchmark classes, in benchmark order.
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
    "bookcase", "board", "clutter",
)

# ScanNet benchmark palette (RGB), one colour per ScanNet-20 class.
SCANNET20_PALETTE = np.array([
    (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34),
    (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189),
    (196, 156, 148), (23, 190, 207), (247, 182, 210), (219, 219, 141), (255, 127, 14),
    (158, 218, 229), (44, 160, 44), (112, 128, 144), (227, 119, 194), (82, 84, 163),
], dtype=np.uint8)
S3DIS_PALETTE = np.array([
    (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 255), (100, 100, 255),
    (200, 200, 100), (170, 120, 200), (255, 0, 0), (200, 100, 100), (10, 200, 100),
    (200, 200, 200), (50, 50, 50),
], dtype=np.uint8)
IGNORE_COLOR = np.array((0, 0, 0), dtype=np.uint8)

DATASETS = {
    "scannet20": {"classes": SCANNET20_CLASSES, "palette": SCANNET20_PALETTE},
    "s3dis": {"classes": S3DIS_CLASSES, "palette": S3DIS_PALETTE},
}


def nyu40_to_scannet20(labels) -> np.ndarray:
    """Map NYU40 ids (0 = unannotated) to ScanNet-20 ids 0..19; every other id -> -1 (ignore)."""
    lut = np.full(256, -1, dtype=np.int64)
    for new, old in enumerate(SCANNET20_NYU40_IDS):
        lut[old] = new
    labels = np.asarray(labels).astype(np.int64)
    out = np.full(labels.shape, -1, dtype=np.int64)
    ok = (labels >= 0) & (labels < 256)
    out[ok] = lut[labels[ok]]
    return out


def class_names(dataset: str):
    try:
        return DATASETS[dataset]["classes"]
    except KeyError:
        raise KeyError(f"unknown dataset '{dataset}', known: {sorted(DATASETS)}") from None


def colorize(labels, dataset: str = "scannet20") -> np.ndarray:
    """Per-point RGB colours for labels (ignore / out-of-range -> black)."""
    pal = DATASETS[dataset]["palette"]
    labels = np.asarray(labels).astype(np.int64)
    out = np.tile(IGNORE_COLOR, (labels.shape[0], 1))
    ok = (labels >= 0) & (labels < len(pal))
    out[ok] = pal[labels[ok]]
    return out
