"""Base CAM methods. Each maps images to named outputs (at least `cams` and `logits`);
loss terms read the outputs they need, so any add-on attaches to any method."""
