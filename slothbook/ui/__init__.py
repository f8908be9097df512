"""The notebook layer: the Studio panel and the pieces the magics share (floor 5).

`Studio` is imported on first use, so `import slothbook.ui` does not pull in ipywidgets.
"""

__all__ = ["Studio"]


def __getattr__(name):
    if name == "Studio":
        from .studio import Studio

        return Studio
    raise AttributeError(f"module 'slothbook.ui' has no attribute {name!r}")
