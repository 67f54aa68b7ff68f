"""A small corpus the training tests share: short sayings, one document each."""

SAYINGS = [
    "Patience is the art of hoping slowly.",
    "Attend to the small things; the large ones are made of them.",
    "A calm mind is a well-kept garden.",
    "The road is long, and that is why we walk it daily.",
    "Still water shows the moon.",
    "Every storm runs out of rain.",
    "A lamp does not ask who is reading.",
    "Seeds keep their promises quietly.",
    "The kettle sings only when it is ready.",
    "Snow forgives the path by hiding it.",
]

# The first six: enough for a run of a few steps, few enough to keep it quick.
SIX_SAYINGS = SAYINGS[:6]
