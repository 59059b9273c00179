"""``custom_root`` and ``custom_fixed_point``: differentiate any solver through its optimality
conditions (Blondel et al. 2022, "Efficient and Modular Implicit Differentiation",
arXiv:2105.15183).

A solver ``solver(init, *params, **kwargs) -> x*`` is decorated with the condition its output
satisfies, ``F(x*(θ), θ) = 0`` with ``θ = params``.  Differentiating that identity gives (the
paper's Section 2.1)::

    A J = B,   A = -∂ₓF(x*, θ),   B = ∂_θF(x*, θ),   J = ∂x*(θ)

so the decorated solver's output gets a derivative without back-propagating through the solver:

* reverse mode (``backward``, ``grad``, ``jacrev``): given ``v = ∂L/∂x*``, solve ``Aᵀ u = v``
  matrix-free (``Aᵀ u`` is a VJP of ``F`` in ``x``) and return ``uᵀ B`` (a VJP of ``F`` in ``θ``);
* forward mode (``jvp``, ``jacfwd``): solve ``A (J θ̇) = B θ̇`` (``B θ̇`` is a JVP of ``F`` in ``θ``).

The solver itself runs once, without autograd, on detached tensors: it may use any Python,
NumPy or ``torch.no_grad`` code, and its output is detached from its own graph.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradkit.core.functional import _under_transform
from gradkit.implicit._linear_solve import (
    LinearSystem,
    SolveOptions,
    linear_solve,
    parse_solve_options,
    vmap_active,
)

__all__ = ["custom_root", "custom_fixed_point"]

logger = logging.getLogger("gradkit")

SolverFn = TypeVar("SolverFn", bound=Callable[..., Any])

# default ||F(x*, θ)|| tolerance (relative to max(1, ||x*||)) of check_optimality=True
_OPTIMALITY_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def _keyword_names(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Names ``fn(x, *params, ...)`` accepts as keywords after ``x`` (None: any, it has ``**kwargs``);
    an empty set when the signature cannot be read."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters[1:] if p.kind in keyword)


def _describe(tree: Any) -> str:
    """``tensor(3,) float64``, ``(tensor(2,) float32, None)``, ``{'w': tensor(4, 2) float64}``..."""
    if isinstance(tree, Tensor):
        return f"tensor{tuple(tree.shape)} {str(tree.dtype).replace('torch.', '')}"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        inner = ", ".join(_describe(v) for v in tree)
        return f"({inner}{',' if len(tree) == 1 else ''})" if isinstance(tree, tuple) else f"[{inner}]"
    return type(tree).__name__ if tree is not None else "None"


class _Call:
    """One call of a decorated solver: the functions, options and the structure of the flattened
    arguments, passed through ``autograd.Function.apply`` as its (non-tensor) first input.

    State: the tree structure of the solution (and of ``aux``) recorded by the first forward;
    the non-tensor leaves of ``aux`` of the latest forward.
    """

    def __init__(
        self, solver: Callable[..., Any], residual: Callable[..., Any], sign: float, opts: SolveOptions,
        has_aux: bool, where: str, fn_name: str, args: tuple[Any, tuple[Any, ...], dict[str, Any]],
        keywords: frozenset[str] | None, checked: set[Any],
    ) -> None:
        self.solver, self.residual, self.sign, self.opts = solver, residual, sign, opts
        # signatures whose residual structure an earlier call already checked (shared by the calls
        # of one decorated solver; used only with check_optimality=False)
        self.checked = checked
        # keyword arguments the optimality function accepts: passed to it and differentiated
        self.shared = [k for k in args[2] if keywords is None or k in keywords]
        self.has_aux, self.where, self.fn_name = has_aux, where, fn_name
        leaves, self.treespec = pytree.tree_flatten(args)
        self.leaves = leaves
        self.tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        n_init = pytree.tree_structure(args[0]).num_leaves
        n_params = pytree.tree_structure(args[1]).num_leaves
        # the differentiated inputs: floating-point tensors among the params and the shared keywords
        self.diff = []
        for k, i in enumerate(self.tensor_pos):
            name = self._kwarg_name(i - n_init - n_params, args[2]) if i >= n_init + n_params else None
            if name is not None and name not in self.shared:
                if leaves[i].requires_grad:
                    raise ValueError(
                        f"{where}: keyword argument {name!r} is a tensor that requires grad, but {fn_name} "
                        f"does not take a keyword {name!r}, so it only configures the solver and is not "
                        f"differentiated; pass it positionally (as one of *params) or as a keyword that "
                        f"{fn_name} accepts to get its gradient, or detach it"
                    )
            elif i >= n_init and leaves[i].is_floating_point():
                self.diff.append(k)
        self.init = args[0]
        self.x_spec: pytree.TreeSpec | None = None
        self.x_is_tensor: list[bool] = []
        self.x_shapes: list[torch.Size] = []
        self.aux_spec: pytree.TreeSpec | None = None
        self.aux_leaves: list[Any] = []

    @staticmethod
    def _kwarg_name(index: int, kwargs: dict[str, Any]) -> str:
        for name, value in kwargs.items():
            n = pytree.tree_structure(value).num_leaves
            if index < n:
                return name
            index -= n
        return "?"

    # ----------------------------------------------------------------- structure
    def rebuild(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_pos, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.treespec)

    def x_tree(self, x_tensors: tuple[Tensor, ...] | list[Tensor]) -> Any:
        it = iter(x_tensors)
        assert self.x_spec is not None
        return pytree.tree_unflatten([next(it) if t else None for t in self.x_is_tensor], self.x_spec)

    @property
    def n_x(self) -> int:
        return sum(self.x_is_tensor)

    def record_solution(self, x: Any) -> list[Tensor]:
        """Validate the solver's output and remember its structure; return its tensors."""
        leaves, spec = pytree.tree_flatten(x)
        for i, leaf in enumerate(leaves):
            if leaf is not None and not (isinstance(leaf, Tensor) and leaf.is_floating_point()):
                what = f"a {leaf.dtype} tensor" if isinstance(leaf, Tensor) else f"a {type(leaf).__name__}"
                raise TypeError(
                    f"{self.where}: the solver returned {_describe(x)}; entry {i} of the solution is {what}, but "
                    "the solution must be floating-point tensors (a tensor, tuple or dict of them; None for an "
                    "absent part); convert NumPy output with torch.as_tensor"
                )
        if not any(isinstance(leaf, Tensor) for leaf in leaves):
            raise TypeError(f"{self.where}: the solver returned {_describe(x)}, which holds no tensor")
        if self.init is not None:
            init_leaves, init_spec = pytree.tree_flatten(self.init)
            same = init_spec == spec and all(
                b is None or (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype)
                for a, b in zip(leaves, init_leaves)
            )
            if not same:
                raise ValueError(
                    f"{self.where}: the solver returned x = {_describe(x)} but init is {_describe(self.init)}: the "
                    "solution must have the structure, shapes and dtypes of init (or pass init=None)"
                )
        is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
        shapes = [leaf.shape for leaf in leaves if isinstance(leaf, Tensor)]
        if self.x_spec is None:
            self.x_spec, self.x_is_tensor, self.x_shapes = spec, is_tensor, shapes
        elif spec != self.x_spec or is_tensor != self.x_is_tensor or shapes != self.x_shapes:
            raise ValueError(f"{self.where}: the solver returned {_describe(x)}, a different structure than "
                             "in an earlier call of the same batch")
        return [leaf for leaf in leaves if isinstance(leaf, Tensor)]

    def record_aux(self, aux: Any) -> list[Tensor]:
        leaves, self.aux_spec = pytree.tree_flatten(aux)
        self.aux_leaves = leaves
        return [leaf for leaf in leaves if isinstance(leaf, Tensor)]

    def aux_tree(self, aux_tensors: tuple[Tensor, ...]) -> Any:
        it = iter(aux_tensors)
        leaves = [next(it) if isinstance(leaf, Tensor) else leaf for leaf in self.aux_leaves]
        assert self.aux_spec is not None
        return pytree.tree_unflatten(leaves, self.aux_spec)

    # ----------------------------------------------------------------- residual
    def call_residual(self, x: Any, tensors: tuple[Tensor, ...] | list[Tensor]) -> Any:
        """``F(x, *params, **shared keywords)``."""
        _, params, kwargs = self.rebuild(tensors)
        return self.residual(x, *params, **{k: kwargs[k] for k in self.shared})

    def flat_residual(self, x_flat: Tensor, tensors: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """``G(x, θ) = sign · F(x, θ)`` on flat vectors (``sign = -1`` for a fixed point, so that
        ``∂ₓG = I - ∂ₓT``)."""
        pieces = torch.split(x_flat, [s.numel() for s in self.x_shapes])
        x = self.x_tree([p.reshape(s) for p, s in zip(pieces, self.x_shapes)])
        out = pytree.tree_leaves(self.call_residual(x, tensors))
        return self.sign * torch.cat([t.reshape(-1) for t in out if t is not None])

    def theta_residual(self, x_tensors: Any, tensors: Any, positions: list[int]) -> Callable[..., Tensor]:
        """``(*θ_k) -> G(x*, θ)`` as a function of the inputs at ``positions`` (the others fixed at
        ``tensors``): the map whose VJP / JVP gives ``uᵀB`` / ``Bθ̇``."""

        def G_theta(*diff: Tensor) -> Tensor:
            full = list(tensors)
            for k, d in zip(positions, diff):
                full[k] = d
            x_flat = torch.cat([t.reshape(-1) for t in x_tensors])
            return self.flat_residual(x_flat, full)

        return G_theta

    def signature(self, x_tensors: list[Tensor], tensors: tuple[Tensor, ...]) -> Any:
        """What the structure of ``F(x*, θ)`` can depend on: the argument and solution structures,
        the tensors' shapes, dtypes and devices, and the other (constant) leaves; None when a
        constant is not hashable."""
        # with their types: True, 1 and 1.0 are equal keys but may give outputs of other structures
        constants = tuple((type(leaf), leaf) for leaf in self.leaves if not isinstance(leaf, Tensor))
        try:
            hash(constants)
        except TypeError:
            return None
        meta = tuple((t.shape, t.dtype, t.device) for t in (*tensors, *x_tensors))
        return self.treespec, self.x_spec, tuple(self.x_is_tensor), meta, constants

    def check_residual(self, x_tensors: list[Tensor], tensors: tuple[Tensor, ...]) -> None:
        """Evaluate ``F(x*, θ)`` once: its structure must match the solution; with
        ``check_optimality`` its norm must be small.  With ``check_optimality=False`` only the
        structure is checked, once per :meth:`signature`."""
        key = self.signature(x_tensors, tensors) if self.opts.check_optimality is False else None
        if key is not None and key in self.checked:
            return
        x = self.x_tree(x_tensors)
        _, params, _ = self.rebuild(tensors)
        try:
            out = self.call_residual(x, tensors)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"{self.where}: {self.fn_name}(x, *params) failed on the solver's output x = {_describe(x)} with "
                f"params = {_describe(params)}: {err}"
            ) from err
        leaves, spec = pytree.tree_flatten(out)
        ok = spec == self.x_spec and all(
            (a is None and not t) or (isinstance(a, Tensor) and t and a.shape == s and a.dtype == d)
            for a, t, s, d in zip(leaves, self.x_is_tensor, *self._padded_shapes_dtypes(x_tensors))
        )
        if not ok:
            raise ValueError(
                f"{self.where}: {self.fn_name}(x, *params) returned {_describe(out)} for the solver's output "
                f"x = {_describe(x)}; it must return one value per unknown: the structure, shapes and dtypes "
                "of x (check the solver's output dtype/shape against what the optimality function expects)"
            )
        check = self.opts.check_optimality
        if check is False:
            if key is not None:
                if len(self.checked) >= 256:
                    self.checked.clear()
                self.checked.add(key)
            return
        dtype = x_tensors[0].dtype
        tol = _OPTIMALITY_TOL.get(dtype, 3e-2) if check is True else float(check)
        res = float(torch.sqrt(sum((t.double() ** 2).sum() for t in leaves if t is not None)))
        scale = max(1.0, float(torch.sqrt(sum((t.double() ** 2).sum() for t in x_tensors))))
        logger.debug("%s: optimality residual %.3e", self.where, res)
        if not res <= tol * scale:
            message = (
                f"{self.where}: the solver's output does not satisfy the optimality condition: "
                f"||{'T(x*, θ) - x*' if self.sign < 0 else 'F(x*, θ)'}|| = {res:.3e} > {tol * scale:.3e} (check_optimality "
                f"tolerance {tol:.1e} x max(1, ||x*||)). Implicit differentiation assumes an exact solution, so its "
                "gradient is off by about this much; solve more accurately, or pass check_optimality=False"
            )
            if self.opts.on_failure == "raise":
                raise RuntimeError(message)
            if self.opts.on_failure == "warn":
                warnings.warn(message, RuntimeWarning, stacklevel=5)  # the decorated solver's caller

    def _padded_shapes_dtypes(self, x_tensors: list[Tensor]) -> tuple[list[Any], list[Any]]:
        it = iter(x_tensors)
        ts = [next(it) if t else None for t in self.x_is_tensor]
        return [t.shape if t is not None else None for t in ts], [t.dtype if t is not None else None for t in ts]

    # ----------------------------------------------------------------- linearisation
    def system(self, x_tensors: tuple[Tensor, ...], tensors: tuple[Tensor, ...], transpose: bool) -> LinearSystem:
        """``M = ∂ₓG`` (forward mode) or ``M = (∂ₓG)ᵀ`` (reverse mode) at ``(x*, θ)``.

        ``(∂ₓG)ᵀ u`` is a VJP of ``G`` (one linearisation, reused by every product).  ``∂ₓG z`` is
        the VJP of that linear map ``u -> (∂ₓG)ᵀ u`` (the "double-VJP" transpose; built once, no
        forward-mode AD needed, and several times cheaper than a ``jvp`` per product under
        ``vmap``).  ``dense`` materialises ``∂ₓG`` by ``jacrev``.
        """
        x_flat = torch.cat([t.reshape(-1) for t in x_tensors])
        G = functools.partial(self.flat_residual, tensors=tensors)
        pullback = transposed = None

        def get_pullback() -> Callable[[Tensor], tuple[Tensor]]:
            nonlocal pullback
            if pullback is None:  # created at this level, never inside the vjp below
                pullback = torch.func.vjp(G, x_flat)[1]
            return pullback

        def rmat(u: Tensor) -> Tensor:  # (∂ₓG)ᵀ u
            return get_pullback()(u)[0]

        def mat(z: Tensor) -> Tensor:  # ∂ₓG z
            nonlocal transposed
            if transposed is None:
                pb = get_pullback()
                transposed = torch.func.vjp(lambda u: pb(u)[0], torch.zeros_like(x_flat))[1]
            return transposed(z)[0]

        def dense() -> Tensor:
            K = torch.func.jacrev(G)(x_flat)
            return K.T if transpose else K

        symmetric = self.opts.method == "cg" or self.opts.symmetric is True
        name = "I - ∂ₓT(x*, θ)" if self.sign < 0 else "∂ₓF(x*, θ)"
        if transpose:
            return LinearSystem(rmat, mat, dense, x_flat.numel(), f"A = ({name})ᵀ")
        # a symmetric system is applied by the cheaper VJP in both modes
        return LinearSystem(rmat if symmetric else mat, mat if symmetric else rmat, dense, x_flat.numel(), f"A = {name}")


class _ImplicitSolve(torch.autograd.Function):
    """Runs the solver in ``forward``; ``backward`` / ``jvp`` are the implicit-function products.

    Inputs: the :class:`_Call`, then every tensor among ``(init, params, kwargs)``; outputs: the
    tensors of the solution, then those of ``aux`` (not differentiable).
    """

    @staticmethod
    def forward(call: _Call, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        init, params, kwargs = call.rebuild([t.detach() for t in tensors])
        with torch.no_grad():
            out = call.solver(init, *params, **kwargs)
        if call.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{call.where}: has_aux=True but the solver returned {_describe(out)}, not (x, aux)")
            x, aux = out
        else:
            x, aux = out, None
        x_tensors = call.record_solution(x)
        aux_tensors = call.record_aux(aux)
        if not any(_under_transform(t) for t in (*tensors, *x_tensors)):
            call.check_residual([t.detach() for t in x_tensors], tuple(t.detach() for t in tensors))
        return tuple(t.detach().clone() for t in (*x_tensors, *aux_tensors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        call = inputs[0]
        ctx.call = call
        ctx.n_inputs = len(inputs) - 1
        saved = (*inputs[1:], *output[: call.n_x])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        if len(output) > call.n_x:
            ctx.mark_non_differentiable(*output[call.n_x:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        tensors, x_tensors = saved[: ctx.n_inputs], saved[ctx.n_inputs:]
        wanted = [k for k in call.diff if ctx.needs_input_grad[k + 1]]
        result: list[Tensor | None] = [None] * (1 + ctx.n_inputs)
        if not wanted:
            return tuple(result)
        grads = grads[: call.n_x]
        v = torch.cat([g.reshape(-1) for g in grads])
        # Aᵀu = v with A = -∂ₓF: solve (∂ₓG)ᵀ w = v, then u = -sign · w and uᵀB = -wᵀ ∂_θG.
        w = linear_solve(call.system(x_tensors, tensors, transpose=True), v, call.opts, fixed=vmap_active())

        pullback = torch.func.vjp(call.theta_residual(x_tensors, tensors, wanted), *[tensors[k] for k in wanted])[1]
        for k, g in zip(wanted, pullback(-w)):
            result[k + 1] = g
        return tuple(result)

    @staticmethod
    def jvp(ctx: Any, _call_tangent: Any, *tangents: Tensor | None) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        tensors, x_tensors = saved[: ctx.n_inputs], saved[ctx.n_inputs:]
        n_aux = sum(isinstance(t, Tensor) for t in call.aux_leaves)
        active = [k for k in call.diff if tangents[k] is not None]
        aux_tangents = tuple(None for _ in range(n_aux))
        if not active:
            return tuple(torch.zeros_like(t) for t in x_tensors) + aux_tangents

        G_theta = call.theta_residual(x_tensors, tensors, active)
        b = torch.func.jvp(G_theta, tuple(tensors[k] for k in active), tuple(tangents[k] for k in active))[1]
        # A (J θ̇) = B θ̇  <=>  ∂ₓG z = ∂_θG θ̇,  J θ̇ = -z
        z = linear_solve(call.system(x_tensors, tensors, transpose=False), b, call.opts, fixed=vmap_active())
        pieces = torch.split(-z, [t.numel() for t in x_tensors])
        return tuple(p.reshape(t.shape) for p, t in zip(pieces, x_tensors)) + aux_tangents

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], call: _Call, *tensors: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """Batching rule: one solve per batch element (the solver need not be ``vmap``-able), each
        through ``apply`` again so that transforms below this one still see the implicit rule."""
        outs = []
        for i in range(info.batch_size):
            sliced = [t if d is None else t.select(d, i) for t, d in zip(tensors, in_dims[1:])]
            outs.append(_ImplicitSolve.apply(call, *sliced))
        stacked = tuple(torch.stack(list(col)) for col in zip(*outs))
        return stacked, (0,) * len(stacked)


def _wrap(
    solver: SolverFn, residual: Callable[..., Any], sign: float, opts: SolveOptions, has_aux: bool, where: str,
    fn_name: str, keywords: frozenset[str] | None,
) -> SolverFn:
    if not callable(solver):
        raise TypeError(f"{where}(...) decorates a solver function solver(init, *params), got {type(solver).__name__}")

    checked: set[Any] = set()

    @functools.wraps(solver)
    def wrapped(init: Any, *params: Any, **kwargs: Any) -> Any:
        call = _Call(solver, residual, sign, opts, has_aux, where, fn_name, (init, params, kwargs), keywords, checked)
        tensors = [call.leaves[i] for i in call.tensor_pos]
        out = _ImplicitSolve.apply(call, *tensors)
        x = call.x_tree(out[: call.n_x])
        return (x, call.aux_tree(out[call.n_x:])) if has_aux else x

    wrapped.solver = solver  # type: ignore[attr-defined]
    return wrapped  # type: ignore[return-value]


def custom_root(
    optimality_fn: Callable[..., Any], solve: str | Callable[..., Any] = "cg", *, has_aux: bool = False,
    **solve_options: Any,
) -> Callable[[SolverFn], SolverFn]:
    """Decorator: differentiate ``solver(init, *params, **kwargs) -> x*`` implicitly through the
    root condition ``optimality_fn(x*, *params) = 0``.

    Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-López, Pedregosa & Vert (2022), "Efficient
    and Modular Implicit Differentiation", NeurIPS, arXiv:2105.15183, Section 2.1 (the
    ``custom_root`` of jaxopt).  With ``F = optimality_fn``, ``θ = params`` and ``x* = solver(...)``::

        A J = B,  A = -∂ₓF(x*, θ),  B = ∂_θF(x*, θ)

    Reverse mode solves ``Aᵀ u = ∂L/∂x*`` and returns ``uᵀ B``; forward mode solves
    ``A (J θ̇) = B θ̇``.  Products with ``A`` and ``B`` are VJPs/JVPs of ``F`` (never materialised,
    except by ``solve="dense"``).  The problem must have as many equations as unknowns:
    ``optimality_fn`` returns the structure, shapes and dtypes of ``x``.

    Arguments of the decorated solver:

    * ``init``: starting point handed to the solver (a tensor, tuple or dict of tensors, or None);
      not differentiated (``x*`` does not depend on it).  When not None, the solver's output must
      match its structure, shapes and dtypes.
    * ``*params``: the ``θ`` of ``F``, passed to both the solver and ``optimality_fn``; each a
      tensor, a tuple/list/dict of tensors (e.g. ``dict(model.named_parameters())``) or any
      non-tensor constant.  **Only the floating-point tensors in ``params`` are differentiated.**
    * ``**kwargs``: passed to the solver, and also to ``optimality_fn`` when it takes a keyword of
      that name (a named parameter after ``x``, or ``**kwargs``), as jaxopt does; the
      floating-point tensors of those shared keywords are differentiated like ``params``.  The
      other keywords (iterations, tolerances) configure the solver only: not differentiated, and
      a tensor among them that requires grad is refused.

    The solver's output (a floating tensor, or tuple/dict of them, None for an absent part) is
    detached from whatever graph the solver built; with ``has_aux=True`` the solver returns
    ``(x, aux)`` and the decorated one returns ``(x, aux)`` with ``aux`` not differentiated (under
    ``vmap`` its tensors are stacked; its non-tensor entries are those of the last batch element).

    ``torch.func`` transforms: the derivative is a ``torch.autograd.Function`` with ``backward``,
    ``jvp`` and a ``vmap`` rule that runs the solver once per batch element (so the solver need not
    be vmap-able), and it composes with ``grad``, ``vmap``, ``jacrev``, ``jacfwd`` and
    higher-order derivatives (``gradgradcheck``, ``torch.func.hessian``).  The linear solve is
    :mod:`gradkit.linalg`'s solver, with early exit and the checks below, except under ``vmap``
    (also inside ``jacrev``, ``jacfwd``, ``hessian``), where Python branches on tensor values are
    impossible: there it runs a fixed number of iterations (``maxiter``, default ``n`` = number of
    unknowns, converged iterates frozen by masks; choose ``maxiter`` for large ``n``) and nothing
    is checked.  Products with ``A`` are VJPs of ``F``; forward mode applies ``A`` as the transpose
    of that VJP (a "double VJP", so ``F`` needs no forward-mode AD except for ``B θ̇``) or, for a
    symmetric ``A`` (``"cg"`` or ``symmetric=True``), by the VJP itself.

    Args:
        optimality_fn: ``F(x, *params)`` returning the residual, shaped like ``x``.
        solve: linear solver for systems with ``A``: ``"cg"`` (default; ``A`` symmetric positive
            definite, e.g. ``F = ∇ₓf`` of a strongly convex ``f``), ``"normal_cg"`` (any
            nonsingular ``A``; squares its condition number), ``"gmres"`` (any nonsingular ``A``),
            ``"neumann"`` (series ``scale Σ (I - scale A)^i``; converges iff the spectral radius of
            ``I - scale A`` is < 1), ``"dense"`` (materialise ``A`` by ``jacrev`` and call
            ``torch.linalg.solve``: small problems), or a callable ``solve(matvec, b, **options)``
            returning ``x`` or a :class:`~gradkit.linalg.SolveResult`.
        has_aux: the solver returns ``(x, aux)``.
        **solve_options: ``ridge`` (``0``: solve with ``A + ridge I`` for an ill-conditioned or
            singular ``A``), ``rtol`` (default ``1e-10`` in float64, ``1e-5`` in float32),
            ``atol`` (``0``), ``maxiter`` (default ``10 n``, ``n`` under ``vmap``), ``restart``
            (gmres, ``30``), ``steps`` (neumann, ``100``), ``scale`` (neumann, ``1.0``),
            ``symmetric`` (``None``: with ``"cg"``, probe the symmetry of ``A`` with two random
            vectors and refuse a non-symmetric one; ``True``: trust it, and apply ``A`` by VJPs
            in forward mode too; ``False``: refuse ``"cg"``), ``on_failure`` (``"warn"``,
            ``"raise"`` or ``"ignore"`` a linear solve that missed ``rtol`` or a solver output
            failing ``check_optimality``), ``check_optimality``
            (``True``: warn when ``||F(x*, θ)|| > tol · max(1, ||x*||)`` with ``tol = 1e-6`` in
            float64, ``1e-3`` in float32; a number: that ``tol``; ``False``: off, and the check
            that ``F`` returns the structure of ``x``, which costs one evaluation of ``F``, runs
            only on the first call with given argument structures, shapes and dtypes), ``M`` (cg: a
            symmetric positive-definite preconditioner ``≈ (A + ridge I)⁻¹``, a callable on flat
            ``(n,)`` vectors in the layout of ``x``, e.g. ``lambda r: r / diagonal`` (Jacobi);
            the same for the backward's ``Aᵀ``, so it must be symmetric).  Other keys go to a
            callable ``solve``.

    Returns:
        A decorator; the decorated solver is called like the original, ``solver(init, *params,
        **kwargs)``, and returns ``x*`` (or ``(x*, aux)``) with the implicit derivative attached.
        No state is kept between calls (each call saves ``x*`` and the params for its backward),
        except, with ``check_optimality=False``, the argument signatures already checked.
    """
    if not callable(optimality_fn):
        raise TypeError(f"custom_root: optimality_fn must be callable F(x, *params), got {type(optimality_fn).__name__}")
    opts = parse_solve_options(solve, solve_options, "custom_root")
    keywords = _keyword_names(optimality_fn)
    return lambda solver: _wrap(solver, optimality_fn, 1.0, opts, has_aux, "custom_root", "optimality_fn", keywords)


def _fixed_point_residual(fixed_point_fn: Callable[..., Any]) -> Callable[..., Any]:
    def residual(x: Any, *params: Any, **kwargs: Any) -> Any:
        tx = fixed_point_fn(x, *params, **kwargs)
        tx_leaves, tx_spec = pytree.tree_flatten(tx)
        x_leaves, x_spec = pytree.tree_flatten(x)
        ok = tx_spec == x_spec and all(
            (a is None) == (b is None) and (a is None or (isinstance(a, Tensor) and a.shape == b.shape))
            for a, b in zip(tx_leaves, x_leaves)
        )
        if not ok:
            return tx  # reported by the structure check with both structures named
        return pytree.tree_unflatten(
            [None if b is None else a - b for a, b in zip(tx_leaves, x_leaves)], x_spec
        )

    return residual


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any], solve: str | Callable[..., Any] = "gmres", *, has_aux: bool = False,
    **solve_options: Any,
) -> Callable[[SolverFn], SolverFn]:
    """Decorator: differentiate ``solver(init, *params, **kwargs) -> x*`` implicitly through the
    fixed-point condition ``x* = fixed_point_fn(x*, *params)``.

    Blondel et al. (2022), arXiv:2105.15183, Section 2.1, fixed points ``x = T(x, θ)`` as the roots
    of ``F(x, θ) = T(x, θ) - x``: ``A = I - ∂ₓT(x*, θ)``, ``B = ∂_θT(x*, θ)``, ``A J = B``.
    Everything else (arguments, transforms, options, checks) is as in :func:`custom_root`.

    ``solve`` defaults to ``"gmres"`` (gradkit's choice; jaxopt defaults to normal CG) because the
    Jacobian of a proximal/projected-gradient or mirror-descent map is in general not symmetric.
    ``"cg"`` is right when ``T`` is a gradient step ``x - η ∇f(x, θ)`` (``A = η ∇²f``); a
    non-symmetric ``∂ₓT`` with ``"cg"`` is refused.  ``"neumann"`` with ``scale=1`` is the series
    ``Σ (∂ₓT)^i``, which converges when ``T`` is a contraction.
    """
    if not callable(fixed_point_fn):
        raise TypeError(
            f"custom_fixed_point: fixed_point_fn must be callable T(x, *params), got {type(fixed_point_fn).__name__}")
    opts = parse_solve_options(solve, solve_options, "custom_fixed_point")
    residual = _fixed_point_residual(fixed_point_fn)
    keywords = _keyword_names(fixed_point_fn)
    return lambda solver: _wrap(
        solver, residual, -1.0, opts, has_aux, "custom_fixed_point", "fixed_point_fn", keywords)
