"""Defaults shared by the library and the command line, in one place."""

#: Global scale of the horseshoe priors (``ghs``, ``rhs``): ``s ~ C+(0, TAU0)``.
TAU0 = 1e-5
#: Slab width of the regularised horseshoe (``rhs``): the group scale never exceeds it.
SLAB_SCALE = 1.0
#: Training examples held out for validation (every choice is made on them, never on the test set).
VAL_SIZE = 5000
#: Added to ``E[x]^2`` in ``log alpha = log Var - log(E^2 + LOG_ALPHA_EPS)``, so a zero mean stays finite.
LOG_ALPHA_EPS = 1e-8
#: The log alpha below which a group counts as kept in the training metrics (``groups_kept``).
KEPT_LOG_ALPHA = -3.0
#: Initial log-variance of every variational scale and weight (the official code's -9).
INIT_LOGVAR = -9.0
#: A class label that labels nothing (a padding token, a void pixel): the likelihood, errors and scores leave it out.
#: PyTorch's (``F.cross_entropy``'s ``ignore_index``).
IGNORED_LABEL = -100
