"""kernel_classifier: the few-shot kernel protocol of Malladi et al. (2023), "A kernel-based view of language model
fine-tuning": classify with the eNTK by kernel regression on one-hot / ±1 targets, kernel logistic regression or a
kernel SVM (the last two through scikit-learn, an optional dependency)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._checks import check_kernel, check_tensor
from ._regression import kernel_regression

SOLVERS = ("regression", "logistic", "svm")
TARGETS = ("onehot", "pm1", "sign")


@dataclass(frozen=True)
class KernelClassifier:
    """Result of ``kernel_classifier``.

    labels    (M,) int64 predicted classes of the test samples
    scores    regression: the regression outputs, (M, num_classes), or (M,) for targets "sign";
              logistic / svm: the estimator's predict_log_proba (M, n_classes) (columns: the sorted classes seen in
              training) where it has one (logistic), else its decision_function ((M,) for two classes, else
              (M, n_classes); SVC without probability=True)
    accuracy  mean(labels == test_labels), or None without test_labels
    solver    the solver used
    model     the fitted scikit-learn estimator (logistic / svm), or the ``KernelRegression`` result
    """
    labels: Tensor
    scores: Tensor
    accuracy: Optional[float]
    solver: str
    model: Any


def _sklearn(solver: str):
    try:
        import sklearn.linear_model
        import sklearn.svm
    except ImportError as e:
        raise ImportError(f"kernel_classifier(solver={solver!r}) needs scikit-learn, an optional dependency of "
                          f"ntk_kernels: pip install scikit-learn (solver='regression' needs only torch)") from e
    return sklearn


def _labels(name: str, labels, n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.numel() and labels.min().item() < 0:
        raise ValueError(f"{name} must be class indices >= 0, got min {labels.min().item()}")
    return labels.long()


def scalar_kernel(K: Tensor) -> Tensor:
    """One kernel per pair of samples: a trace kernel as it is, a diagonal or full kernel as Σ_c K_cc."""
    if K.ndim == 2:
        return K
    if K.ndim == 3:
        return K.sum(-1)
    return K.diagonal(dim1=-2, dim2=-1).sum(-1)


def kernel_classifier(K_train: Tensor, labels, K_test_train: Tensor, solver: str = "regression", *,
                      num_classes: Optional[int] = None, targets: Optional[str] = None, ridge: float = 0.0,
                      relative_ridge: bool = False, f0_train: Optional[Tensor] = None,
                      f0_test: Optional[Tensor] = None, test_labels=None,
                      sklearn_kwargs: Optional[Dict[str, Any]] = None, estimator: Any = None) -> KernelClassifier:
    """Few-shot classification with a (e)NTK, the protocol of Malladi et al. (2023), "A kernel-based view of
    language model fine-tuning" (their kernel solvers; the kernel there is the eNTK of prompt-based fine-tuning,
    one output per label word).

    solver="regression"   ``kernel_regression`` on targets Y (N, C), labels = argmax of the test outputs:
                          targets "onehot" Y = e_label, "pm1" Y = 2 e_label − 1; or "sign" (two classes, a single
                          output: y = +1 for class 1, −1 for class 0, label = [f > 0]).  Default: "sign" for a
                          single-output kernel (full / diagonal with C = 1), else "onehot".  A trace kernel is used
                          as K ⊗ I_C; a full / diagonal kernel needs C = num_classes outputs.  ridge, relative_ridge,
                          f0_train, f0_test as in ``kernel_regression`` (f0 in the targets' shape).
    solver="logistic"     logistic regression fitted, as in the paper's code, on the rows of the kernel as
                          features (K_train (N, N): N features; at test the rows of K_test_train); default
                          scikit-learn's LogisticRegression(max_iter=10000); the paper used
                          ``estimator=LogisticRegressionCV(max_iter=10000, random_state=0)``.  Multi-class through
                          scikit-learn.
    solver="svm"          scikit-learn's SVC(kernel="precomputed") (or ``estimator``, an SVC / SVR-like estimator
                          with kernel="precomputed").
                          For logistic and svm a diagonal or full kernel is reduced to the scalar kernel Σ_c K_cc
                          (the eNTK's trace).  ``sklearn_kwargs`` go to the default estimator (e.g. {"C": 10});
                          ``estimator`` replaces it (an unfitted scikit-learn classifier; it is fitted in place).

    labels       (N,) integer class indices in [0, num_classes); num_classes defaults to max(labels) + 1.
    test_labels  optional (M,) for ``accuracy``.
    Returns ``KernelClassifier`` (labels, scores, accuracy, solver, model).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    mode, C = check_kernel("K_train", K_train)
    N = K_train.shape[0]
    y = _labels("labels", labels, N)
    if num_classes is None:
        num_classes = int(y.max().item()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if y.max().item() >= num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got max {y.max().item()}")
    if K_test_train is None:
        raise ValueError("K_test_train is required (the kernel between the test and training samples)")
    check_kernel("K_test_train", K_test_train, square=False)
    if tuple(K_test_train.shape[1:]) != tuple(K_train.shape[1:]):
        raise ValueError(f"K_test_train must have shape (M, {', '.join(map(str, K_train.shape[1:]))}) to match "
                         f"K_train {tuple(K_train.shape)}, got {tuple(K_test_train.shape)}")
    M = K_test_train.shape[0]
    yt = None if test_labels is None else _labels("test_labels", test_labels, M).to(K_train.device)

    if solver == "regression":
        if targets is None:
            targets = "sign" if (mode != "trace" and C == 1) else "onehot"
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS} or None, got {targets!r}")
        if targets == "sign":
            if num_classes != 2:
                raise ValueError(f"targets='sign' needs two classes, got num_classes = {num_classes}")
            if mode != "trace" and C != 1:
                raise ValueError(f"targets='sign' needs a single-output kernel, got K_train {tuple(K_train.shape)}")
            Y = 2.0 * y.to(K_train.device, torch.float64) - 1.0
        else:
            if mode != "trace" and C != num_classes:
                raise ValueError(f"a {mode} kernel with C = {C} outputs cannot regress on {num_classes} one-hot "
                                 f"targets: K_train must have C = num_classes outputs (or use a trace kernel)")
            Y = torch.nn.functional.one_hot(y, num_classes).to(K_train.device, torch.float64)
            if targets == "pm1":
                Y = 2.0 * Y - 1.0
        if sklearn_kwargs or estimator is not None:
            raise ValueError("sklearn_kwargs and estimator apply to the logistic and svm solvers only")
        reg = kernel_regression(K_train, Y, K_test_train, ridge=ridge, relative_ridge=relative_ridge,
                                f0_train=f0_train, f0_test=f0_test)
        scores = reg.test
        pred = (scores > 0).long() if targets == "sign" else scores.argmax(-1)
        model: Any = reg
    else:
        if f0_train is not None or f0_test is not None or targets is not None or ridge != 0.0 or relative_ridge:
            raise ValueError(f"f0_train, f0_test, targets, ridge and relative_ridge apply to solver='regression' "
                             f"only, not {solver!r}")
        if len(torch.unique(y)) < 2:
            raise ValueError(f"solver={solver!r} needs at least two classes among the labels")
        check_tensor("K_test_train", K_test_train)
        sk = _sklearn(solver)
        Ks = scalar_kernel(K_train).detach().double().cpu().numpy()
        Kt = scalar_kernel(K_test_train).detach().double().cpu().numpy()
        kw = dict(sklearn_kwargs or {})
        if estimator is not None:
            if kw:
                raise ValueError("pass either sklearn_kwargs (for the default estimator) or estimator, not both")
            if not (hasattr(estimator, "fit") and hasattr(estimator, "predict")):
                raise TypeError(f"estimator must be a scikit-learn estimator (fit / predict), got "
                                f"{type(estimator).__name__}")
            if solver == "svm" and getattr(estimator, "kernel", None) != "precomputed":
                raise ValueError(f"estimator for solver='svm' must have kernel='precomputed', got "
                                 f"{getattr(estimator, 'kernel', None)!r}")
            model = estimator
        elif solver == "logistic":
            model = sk.linear_model.LogisticRegression(**{"max_iter": 10_000, **kw})
        else:
            model = sk.svm.SVC(**{"kernel": "precomputed", **kw})
        model.fit(Ks, y.cpu().numpy())
        if hasattr(model, "predict_log_proba"):
            scores = torch.as_tensor(model.predict_log_proba(Kt))
        else:
            scores = torch.as_tensor(model.decision_function(Kt))
        pred = torch.as_tensor(model.predict(Kt)).long()
        scores, pred = scores.to(K_train.device), pred.to(K_train.device)
    acc = None if yt is None else (pred == yt).double().mean().item()
    return KernelClassifier(pred, scores, acc, solver, model)
