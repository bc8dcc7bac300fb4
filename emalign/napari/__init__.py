"""napari integration (npe2 plugin, manifest ``napari.yaml``).

* :mod:`emalign.napari.reader`: opens an emalign output (aligned OME-Zarr) as layers: the aligned
  pyramid, the raw input, the fields (magnitude image and decimated vectors) and the QC flags.
* :mod:`emalign.napari.widget`: a dock widget that aligns an image layer (or a z-range of it) in
  a worker thread.
* :mod:`emalign.napari.view`: what ``emalign view PATH`` opens (side-by-side grid and an xz window).

Only the widget and the view import napari; the reader builds plain layer-data tuples.
"""
