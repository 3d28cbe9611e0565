"""Class lists, label maps and palettes: defined once, here."""
import numpy as np

SCANNET20_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)
# NYU40 ids of the 20 benchmark classes, in benchmark order.
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

# ScanNet-200 benchmark: the category ids (the ``id`` column of ScanNet's scannetv2-labels.combined.tsv) of its 200
# classes, in benchmark order, and their names. A scene's ``segment200.npy`` holds the position of the point's
# category in this tuple (0..199), -1 for every other category and for unannotated points: the meaning that
# Pointcept's ScanNet200 loader reads (its preprocessing writes the same file the same way).
SCANNET200_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 21, 22,
    23, 24, 26, 27, 28, 29, 31, 32, 33, 34, 35, 36, 38, 39, 40, 41, 42, 44, 45, 46,
    47, 48, 49, 50, 51, 52, 54, 55, 56, 57, 58, 59, 62, 63, 64, 65, 66, 67, 68, 69,
    70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 82, 84, 86, 87, 88, 89, 90, 93, 95,
    96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 110, 112, 115, 116, 118, 120, 121, 122,
    125, 128, 130, 131, 132, 134, 136, 138, 139, 140, 141, 145, 148, 154, 155, 156, 157, 159, 161, 163,
    165, 166, 168, 169, 170, 177, 180, 185, 188, 191, 193, 195, 202, 208, 213, 214, 221, 229, 230, 232,
    233, 242, 250, 261, 264, 276, 283, 286, 300, 304, 312, 323, 325, 331, 342, 356, 370, 392, 395, 399,
    408, 417, 488, 540, 562, 570, 572, 581, 609, 748, 776, 1156, 1163, 1164, 1165, 1166, 1167, 1168, 1169, 1170,
    1171, 1172, 1173, 1174, 1175, 1176, 1178, 1179, 1180, 1181, 1182, 1183, 1184, 1185, 1186, 1187, 1188, 1189, 1190, 1191,
)
SCANNET200_CLASSES = (
    "wall", "chair", "floor", "table", "door", "couch", "cabinet", "shelf", "desk", "office chair",
    "bed", "pillow", "sink", "picture", "window", "toilet", "bookshelf", "monitor", "curtain", "book",
    "armchair", "coffee table", "box", "refrigerator", "lamp", "kitchen cabinet", "towel", "clothes", "tv", "nightstand",
    "counter", "dresser", "stool", "cushion", "plant", "ceiling", "bathtub", "end table", "dining table", "keyboard",
    "bag", "backpack", "toilet paper", "printer", "tv stand", "whiteboard", "blanket", "shower curtain", "trash can",
    "closet",
    "stairs", "microwave", "stove", "shoe", "computer tower", "bottle", "bin", "ottoman", "bench", "board",
    "washing machine", "mirror", "copier", "basket", "sofa chair", "file cabinet", "fan", "laptop", "shower", "paper",
    "person", "paper towel dispenser", "oven", "blinds", "rack", "plate", "blackboard", "piano", "suitcase", "rail",
    "radiator", "recycling bin", "container", "wardrobe", "soap dispenser", "telephone", "bucket", "clock", "stand",
    "light",
    "laundry basket", "pipe", "clothes dryer", "guitar", "toilet paper holder", "seat", "speaker", "column", "bicycle",
    "ladder",
    "bathroom stall", "shower wall", "cup", "jacket", "storage bin", "coffee maker", "dishwasher", "paper towel roll",
    "machine", "mat",
    "windowsill", "bar", "toaster", "bulletin board", "ironing board", "fireplace", "soap dish", "kitchen counter",
    "doorframe", "toilet paper dispenser",
    "mini fridge", "fire extinguisher", "ball", "hat", "shower curtain rod", "water cooler", "paper cutter", "tray",
    "shower door", "pillar",
    "ledge", "toaster oven", "mouse", "toilet seat cover dispenser", "furniture", "cart", "storage container", "scale",
    "tissue box", "light switch",
    "crate", "power outlet", "decoration", "sign", "projector", "closet door", "vacuum cleaner", "candle", "plunger",
    "stuffed animal",
    "headphones", "dish rack", "broom", "guitar case", "range hood", "dustpan", "hair dryer", "water bottle",
    "handicap bar", "purse",
    "vent", "shower floor", "water pitcher", "mailbox", "bowl", "paper bag", "alarm clock", "music stand",
    "projector screen", "divider",
    "laundry detergent", "bathroom counter", "object", "bathroom vanity", "closet wall", "laundry hamper",
    "bathroom stall door", "ceiling light", "trash bin", "dumbbell",
    "stair rail", "tube", "bathroom cabinet", "cd case", "closet rod", "coffee kettle", "structure", "shower head",
    "keyboard piano", "case of water bottles",
    "coat rack", "storage organizer", "folded chair", "fire alarm", "power strip", "calendar", "poster",
    "potted plant", "luggage", "mattress",
)

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


def category_to_scannet200(category_ids) -> np.ndarray:
    """Map ScanNet category ids (the tsv ``id``; -1 or 0 = none) to ScanNet-200 indices 0..199; every id outside the
    200 benchmark categories -> -1 (ignore)."""
    ids = np.asarray(category_ids).astype(np.int64)
    lut = np.full(max(SCANNET200_CATEGORY_IDS) + 1, -1, dtype=np.int64)
    lut[list(SCANNET200_CATEGORY_IDS)] = np.arange(len(SCANNET200_CATEGORY_IDS))
    out = np.full(ids.shape, -1, dtype=np.int64)
    ok = (ids >= 0) & (ids < lut.shape[0])
    out[ok] = lut[ids[ok]]
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
