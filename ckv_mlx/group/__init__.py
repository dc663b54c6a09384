"""Several processes as one model, as ``mlx.launch`` starts them: what they say to each
other (``ranks.py``) and which part of the model each one holds (``placement.py``)."""
