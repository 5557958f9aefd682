"""The pipeline users build: RefreshingWebDataset and its stages (shuffle, batching, tensors),
webdataset's arguments, and the epoch's length."""
