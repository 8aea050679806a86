"""Machinery shared by several component families, below the components.

* :mod:`qlrlab.backends.fastpath`: the fast-path recorder (layer chains recorded during the
  gradient pass; the GGN's closed-form products and cheap :math:`f(\\theta_{new})`);
* :mod:`qlrlab.backends.kfac_hooks`: Kronecker-factor capture with module hooks (K-FAC,
  AdaFisher);
* :mod:`qlrlab.backends.curvlinops_adapter`: curvlinops linear operators behind
  :class:`~qlrlab.interfaces.BoundCurvature`.

Modules here import the interfaces and low-level helpers, never a component.
"""
