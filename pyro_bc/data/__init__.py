"""Data in: the readers of MNIST (IDX), NumPy archives and CIFAR batches, splits, minibatches, augmentation."""
