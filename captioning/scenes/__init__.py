"""The synthetic benchmark: the scene generator, its caption grammar (which also judges captions and prefixes), the
scene metrics, the oracle exposure metrics and the scene-label pretraining of the CNN. Above data/ and models/ (it
uses both); nothing below it imports it, so COCO users can ignore the package."""
