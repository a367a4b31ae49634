"""Tools around the captioning package: benchmarks, tables, COCO checks, the fault campaign. Most are scripts
(`python tools/NAME.py`); fault_campaign is a package (`python tools/fault_campaign`), imported by its test as
`tools.fault_campaign` (pytest puts the checkout on sys.path: pyproject's `pythonpath`)."""
