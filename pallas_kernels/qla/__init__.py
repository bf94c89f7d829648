"""VISTA quasi-linear attention (QLA; "Massive Memorization with Hundreds of Trillions of Parameters
for Sequential Transducer Generative Recommenders", Section 3.2.2, the QLU module, gradients in
Appendix B): jagged, SiLU-featured linear attention whose virtual seeds attend to the history and to
themselves, never to each other.

Callers use :func:`pallas_kernels.qla.api.qla` (``impl`` = ``"auto"``, ``"pallas_triton"`` or
``"xla"``). Modules: ``reference`` (the pure-jnp contract ``qla_reference`` and the softmax
"VISTA w/o QLA" comparison ``softmax_seed_attention_reference``), ``config`` (:class:`QlaConfig`),
``pallas_triton`` (the forward and backward kernels), ``vjp`` (the kernels as one differentiable
function), ``api``.
"""
