"""The soft losses of distillation (each Problem's `soft_loss` calls one): a teacher's outputs against a student's."""

from __future__ import annotations


def softmax_kl(logits, teacher, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), the mean over rows (Hinton et al., as timm's
    distillation task: the T^2 keeps the gradient's scale independent of T)."""
    import torch.nn.functional as F

    log_student, log_teacher = (F.log_softmax(x.float() / temperature, dim=-1) for x in (logits, teacher))
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def binary_kl(logits, teacher, temperature: float):
    """Per label, the binary KL between the teacher's and the student's sigmoids at T, averaged over labels and
    rows, times T^2: multi-label outputs are independent, so no softmax spans them."""
    import torch
    import torch.nn.functional as F

    student, teacher = logits.float() / temperature, teacher.float() / temperature
    p = torch.sigmoid(teacher)
    kl = (p * (F.logsigmoid(teacher) - F.logsigmoid(student))
          + (1 - p) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))
    return kl.mean() * temperature ** 2


def words_on_labelled_positions(rows: list, labels, ignore_index: int):
    """Each row's teacher outputs per word onto the student's labelled sub-tokens (the words' first ones, in order):
    (batch, tokens, tags), NaN where the student has no word or the teacher cut it off."""
    import torch

    targets = torch.full((*labels.shape, rows[0].shape[-1]), float("nan"), device=labels.device)
    for i, words in enumerate(rows):
        positions = (labels[i] != ignore_index).nonzero().view(-1)[:len(words)]
        targets[i, positions] = torch.as_tensor(words[:len(positions)], dtype=torch.float32, device=labels.device)
    return targets


def masked_softmax_kl(logits, teacher, mask, temperature: float):
    """softmax_kl over the positions `mask` keeps (tokens); 0 with the graph kept where it keeps none."""
    if not bool(mask.any()):
        return logits.float().sum() * 0.0
    return softmax_kl(logits[mask], teacher[mask], temperature)


def stacked(rows: list, device):
    """An array per row (a teacher's cached outputs) as one float tensor."""
    import numpy as np
    import torch

    return torch.as_tensor(np.stack(rows), dtype=torch.float32, device=device)


def squared_distance(logits, teacher):
    """Regression's soft loss: the mean squared distance to the teacher's (standardised) prediction."""
    import torch.nn.functional as F

    return F.mse_loss(logits.float().view(-1), teacher.float().view(-1))
