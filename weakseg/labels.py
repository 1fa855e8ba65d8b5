"""The one label-map convention shared by every module: 8-bit class ids, and IGNORE (255)
for pixels that carry no label (VOC's void border, an unconfident pseudo-label, no
prediction). Metrics leave ground-truth IGNORE pixels out; training ignores them."""

IGNORE = 255
