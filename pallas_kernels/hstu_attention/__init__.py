"""HSTU attention ("Actions Speak Louder than Words", Section 3.1 eq. 2): jagged, pointwise (SiLU,
no softmax) attention with the relative attention bias rab^{p,t} and M-FALCON target masking.

Callers use :func:`pallas_kernels.hstu_attention.api.hstu_attention` (``impl`` = ``"auto"``,
``"pallas_triton"`` or ``"xla"``). Modules: ``reference`` (the pure-jnp contract, the
bucket functions ``pos_bucket``/``time_bucket`` and their sizes), ``config``
(:class:`HstuAttentionConfig`),
``pallas_triton`` (the forward kernel and the two backward kernels), ``vjp`` (the kernels as one
differentiable function), ``api``.
"""
