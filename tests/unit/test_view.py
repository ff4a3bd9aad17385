"""The viewer page escapes the text of its data (hostile prompts and samples)."""
from conftest import hostile_page


def test_viewer_escapes_data_text(tmp_path):
    html = hostile_page(tmp_path).read_text()
    data = html[html.index('id="data">'):html.index("</script>", html.index('id="data">'))]
    assert "<" not in data.split(">", 1)[1]      # no raw '<' inside the data block
    assert html.count("<script") == 2            # the data block and the page's own code
