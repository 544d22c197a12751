"""Data: procedural shapes and image folders as grain sources, tokenizer, loaders."""
from mmjax.data.folder import CaptionFolderSource, ImageFolderSource, load_image
from mmjax.data.pipeline import SKIPPED, VALID, Loader, make_source
from mmjax.data.shapes import ShapesSource, binding_set, retrieval_set, zeroshot_set
from mmjax.data.tokenizer import Tokenizer, default_shapes_tokenizer, load_tokenizer, train_tokenizer
