"""The throughput benchmark (``make bench``): ``run.py`` (the command), ``options.py`` (its arguments and network),
``peer.py`` (diffusers' networks of the same shape), ``ema.py``, ``accuracy.py``, ``report.py``."""
