"""The synthetic web's vocabulary: the visual concepts it draws and the words alt-texts use.

Everything here is an immutable table. Indices into these tables are the integer labels
carried by scenes (`scenes.py`), truth tables and eval sets.
"""
from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "pentagon", "diamond", "cross")

# Foreground colours: saturated, far from every background colour below.
COLORS = (
    ("red", (220, 30, 35)),
    ("green", (35, 165, 60)),
    ("blue", (35, 75, 220)),
    ("yellow", (245, 210, 30)),
    ("orange", (245, 135, 20)),
    ("purple", (135, 55, 185)),
    ("pink", (245, 115, 180)),
    ("cyan", (30, 200, 215)),
    ("brown", (125, 75, 35)),
)
COLOR_NAMES = tuple(name for name, _ in COLORS)

# Backgrounds are muted so the objects stand out whatever the texture.
BG_COLORS = (
    ("grey", (212, 212, 212)),
    ("beige", (238, 228, 205)),
    ("light blue", (208, 224, 240)),
    ("dark", (48, 52, 62)),
    ("white", (248, 248, 244)),
)
BACKGROUNDS = ("solid", "stripes", "dots", "gradient", "noise")
SIZES = ("small", "medium", "large")
SIZE_FACTORS = (0.5, 0.7, 0.9)  # object radius as a fraction of half a grid cell
MAX_COUNT = 6
KINDS = ("shapes", "digit", "word")

# 3x3 grid cells, row-major; a single object's cell is its position label.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES = (
    ("in the top left corner", "top-left"),
    ("at the top", "near the top edge"),
    ("in the top right corner", "top-right"),
    ("on the left", "on the left side"),
    ("in the center", "in the middle"),
    ("on the right", "on the right side"),
    ("in the bottom left corner", "bottom-left"),
    ("at the bottom", "near the bottom"),
    ("in the bottom right corner", "bottom-right"),
)

WORDS = (
    "apple", "river", "music", "garden", "house", "cloud", "tiger", "pizza",
    "rocket", "coffee", "winter", "planet", "bridge", "candle", "dragon", "forest",
    "guitar", "island", "lemon", "ocean", "pencil", "robot", "violin", "zebra",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Alt-texts use synonyms as often as the canonical names (the first of each tuple).
COLOR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "navy"),
    "yellow": ("yellow", "golden", "lemon"),
    "orange": ("orange", "tangerine", "amber"),
    "purple": ("purple", "violet", "lilac"),
    "pink": ("pink", "rose", "magenta"),
    "cyan": ("cyan", "turquoise", "teal"),
    "brown": ("brown", "chocolate", "tan"),
}
SHAPE_SYNONYMS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon", "six-sided shape"),
    "pentagon": ("pentagon", "five-sided shape"),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
SIZE_SYNONYMS = (("small", "tiny", "little"), ("medium", "medium-sized", "mid-size"), ("large", "big", "huge"))
BACKGROUND_PHRASES = (
    ("plain", "solid"),
    ("striped", "stripy"),
    ("dotted", "polka-dot"),
    ("gradient", "faded"),
    ("noisy", "grainy"),
)

# A few captions in other languages: (colour words, shape words, templates).
FOREIGN = {
    "fr": (
        ("rouge", "vert", "bleu", "jaune", "orange", "violet", "rose", "cyan", "marron"),
        ("cercle", "carré", "triangle", "étoile", "hexagone", "pentagone", "losange", "croix"),
        ("un {shape} {color}", "photo d'un {shape} {color} sur fond uni", "{shape} {color}, dessin"),
        ("chiffre manuscrit {d}", "un panneau qui dit « {w} »"),
    ),
    "de": (
        ("rot", "grün", "blau", "gelb", "orange", "lila", "rosa", "türkis", "braun"),
        ("Kreis", "Quadrat", "Dreieck", "Stern", "Sechseck", "Fünfeck", "Raute", "Kreuz"),
        ("{shape} in {color}", "Bild: ein {shape}, Farbe {color}", "{color}es Symbol: {shape}"),
        ("handgeschriebene Ziffer {d}", "ein Schild mit der Aufschrift „{w}“"),
    ),
    "es": (
        ("rojo", "verde", "azul", "amarillo", "naranja", "morado", "rosa", "cian", "marrón"),
        ("círculo", "cuadrado", "triángulo", "estrella", "hexágono", "pentágono", "rombo", "cruz"),
        ("un {shape} {color}", "foto de un {shape} de color {color}", "{shape} {color} sobre fondo claro"),
        ("dígito escrito a mano {d}", "un letrero que dice \"{w}\""),
    ),
    "zh": (
        ("红色", "绿色", "蓝色", "黄色", "橙色", "紫色", "粉色", "青色", "棕色"),
        ("圆形", "正方形", "三角形", "星形", "六边形", "五边形", "菱形", "十字"),
        ("{color}的{shape}", "一个{color}{shape}的图片", "{shape}（{color}）"),
        ("手写数字{d}", "写着“{w}”的牌子"),
    ),
}

SPAM_WORDS = (
    "best", "cheap", "buy now", "free shipping", "sale", "discount", "wholesale", "top rated",
    "2024", "hd", "wallpaper", "download", "png", "clipart", "vector", "official", "deal",
    "limited offer", "high quality", "lowest price", "order today", "free", "online",
)
FILLER_SENTENCES = (
    "Posted by admin in Uncategorized.",
    "Click here to see more images like this one.",
    "All rights reserved by their respective owners.",
    "This image was uploaded by a visitor of our website.",
    "Share this picture with your friends on social media.",
    "Related searches include pictures, photos and graphics.",
    "We do not own any of the images shown on this page.",
)
