"""Views of recordings: plotly figures, the ipywidgets dashboard and the offline HTML report."""
