"""One module per section of the page. Each renders its part as an HTML string, empty when the run
has nothing to show there; :mod:`tuneline.report.render` puts them in order."""
