"""The tiny run most end-to-end tests train: a 32-wide MLP on the `data_root` fixture's fake Fashion-MNIST
(imbalance 5, about 200 training images): a few seconds an epoch on one CPU thread. Modules add their own
keys after it (a later override of the same key wins)."""
TINY_MLP = [
    "data.name=fashion_mnist_lt", "data.imbalance=5", "data.batch_size=16", "data.augment=none",
    "model.name=mlp", "model.width=32", "optim.lr=0.05", "eval.batch_size=64",
]
