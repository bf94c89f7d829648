"""SKUT ("single kernel unified transformer", paper §3.4.2): the whole TransAct V2 encoder
(``torch.nn.TransformerEncoderLayer`` post-LN layers, causal + key-padding masks) in one Pallas
kernel.

Callers use :func:`pallas_kernels.skut.api.skut` (``impl`` = ``"auto"``, ``"pallas_triton"`` or
``"xla"``). Modules: ``reference`` (the pure-jnp contract and :class:`EncoderWeights`), ``config``
(:class:`SkutConfig`), ``pallas_triton`` (the kernel, forward only), ``vjp`` (the kernel made
differentiable), ``api``.
"""
