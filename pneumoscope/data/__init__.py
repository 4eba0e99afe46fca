"""Data: discovery of the Kermany layout, patient ids, splits, audit, decode, datasets."""
