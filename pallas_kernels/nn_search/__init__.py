"""NN search (paper §3.2.2 eq. 3, §3.4.2): for every candidate, the K tokens of its request's int8
sequence with the highest cosine score (dequantized, L2-normalized tokens against the normalized
candidate), ties to the lower index, padding never selected, in chronological order.

Callers use :func:`pallas_kernels.nn_search.api.nn_search` (dense, jagged and grouped layouts;
``impl`` = ``"auto"``, ``"pallas_triton"`` or ``"xla"``). Modules: ``reference`` (the pure-jnp
contract), ``config`` (:class:`NNSearchConfig`, ``MAX_K``), ``pallas_triton`` (the fused,
broadcast-free kernel on the jagged layout), ``profile`` (the kernel stopped early, for
``bench/nn_search.py --profile``), ``api``.
"""
