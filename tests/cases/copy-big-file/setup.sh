i=0; while [ $i -lt 2000 ]; do echo "line $i of a file big enough to span many tar blocks and gzip windows"; i=$((i+1)); done > big.bin
: > empty.txt
