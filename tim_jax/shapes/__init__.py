"""The built-in captioned-shapes world: scenes, captions, the oracle that
reads them back, its scores and the NFE study."""
