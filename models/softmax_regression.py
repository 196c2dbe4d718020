"""SoftmaxRegression: multinomial logistic regression, the convex baseline."""
from models.layers.base import check_num_classes, check_positive_int
from models.layers import Dense
from models.sequential import Sequential


class SoftmaxRegression(Sequential):
    """One Dense layer from ``input_dim`` features to ``num_classes`` logits (Glorot init).

    Args:
        input_dim: number of features per example.
        num_classes: number of classes (>= 2).
    """

    def __init__(self, input_dim, num_classes):
        self.input_dim = check_positive_int(input_dim, "input_dim")
        check_num_classes(num_classes)
        super().__init__([Dense(num_classes, init="glorot")], input_shape=(self.input_dim,))

    def __repr__(self):
        return f"SoftmaxRegression(input_dim={self.input_dim}, num_classes={self.num_outputs})"
