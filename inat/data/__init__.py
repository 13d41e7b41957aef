"""Data layer: folder scanning, download, audit, split, decode-once cache, augmentation."""
