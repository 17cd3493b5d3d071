"""No-download datasets for the dense tasks, made from real CIFAR-10 images by documented, seeded procedures.

Each builder takes the source images as arrays (the embedded subset, the JPEG ``.npz`` or the official archives), so
the product never needs a particular copy of CIFAR-10 on disk.
"""
