"""Evaluating a model: decode a split, score it next to the most-common-caption reference (`evaluate`), and
write, print and log the result (`reports`). Validation, the final test of a training run and
`captioning-eval` all go through here, so that they report the same figures."""
