mkdir dir
echo shared > dir/a
ln dir/a dir/b
echo alone > dir/c
